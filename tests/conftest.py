"""Shared fixtures: every test session gets its own cache directory (synthetic corpus + feature cache)."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """Point SPEECHBENCH_CACHE at a fresh directory for the whole session, so the tiny corpus is built once."""
    path = tmp_path_factory.mktemp("speechbench-cache")
    old = os.environ.get("SPEECHBENCH_CACHE")
    os.environ["SPEECHBENCH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SPEECHBENCH_CACHE", None)
    else:
        os.environ["SPEECHBENCH_CACHE"] = old


@pytest.fixture(scope="session")
def synth_tiny(session_cache):
    """The tiny synthetic corpus (all seven tasks), generated once per session into the session cache."""
    from speechbench.downstreams.synth.corpus import ensure_corpus

    return ensure_corpus("tiny", seed=0, progress=False)


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one thread is fastest, and avoids spin-waiting on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
