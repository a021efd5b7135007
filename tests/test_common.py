"""The bottom layer (speechbench.common): locations, threads, atomic writes, hashing, error types."""

import hashlib
from pathlib import Path

import pytest

from speechbench import common
from speechbench.common import (
    SpeechbenchError,
    UnknownNameError,
    atomic_path,
    atomic_write_text,
    cache_root,
    default_threads,
    sha256_file,
    usable_cpus,
)


def test_cache_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SPEECHBENCH_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "speechbench"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root("features") == tmp_path / "xdg" / "speechbench" / "features"
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path / "mine"))
    assert cache_root("synth") == tmp_path / "mine" / "synth"


def test_every_cache_user_follows_the_root(monkeypatch, tmp_path):
    from speechbench.benchmark.cache import cache_root as features_root
    from speechbench.downstreams.synth.corpus import default_cache_dir
    from speechbench.upstreams.fetch import cache_dir

    monkeypatch.delenv("SPEECHBENCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    base = tmp_path / "speechbench"
    assert (features_root(), default_cache_dir(), cache_dir()) == (base / "features", base / "synth",
                                                                   base / "checkpoints")


def test_threads_follow_affinity_quota_and_override(monkeypatch):
    monkeypatch.delenv("SPEECHBENCH_THREADS", raising=False)
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(common.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(common, "_cgroup_cpu_limit", lambda: None)
    assert usable_cpus() == 6 and default_threads() == 6  # affinity, not the machine's 64
    monkeypatch.setattr(common, "_cgroup_cpu_limit", lambda: 2.5)  # a container quota of 2.5 CPUs
    assert usable_cpus() == 2
    monkeypatch.setenv("SPEECHBENCH_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("SPEECHBENCH_THREADS", "many")
    with pytest.raises(SpeechbenchError, match="SPEECHBENCH_THREADS='many'"):
        default_threads()


def test_cgroup_quota_is_read(monkeypatch, tmp_path):
    cpu_max = tmp_path / "cpu.max"
    real_path = common.Path

    def fake_path(p):
        return real_path(cpu_max) if str(p) == "/sys/fs/cgroup/cpu.max" else real_path(tmp_path / "absent")

    monkeypatch.setattr(common, "Path", fake_path)
    cpu_max.write_text("150000 100000\n")
    assert common._cgroup_cpu_limit() == 1.5
    cpu_max.write_text("max 100000\n")
    assert common._cgroup_cpu_limit() is None


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "sub" / "result.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        Path(tmp).write_text("half-written")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in target.parent.iterdir()] == ["result.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 40000  # > one 4 MiB block
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_user_errors_share_one_base():
    from speechbench.benchmark.config import ConfigError
    from speechbench.downstreams.data import DataError
    from speechbench.leaderboard.collect import BadResultError, NoResultsError
    from speechbench.upstreams.checkpoints import CheckpointError, UnsafeCheckpointError
    from speechbench.upstreams.registry import UnknownUpstreamError

    for cls in (ConfigError, DataError, CheckpointError, UnsafeCheckpointError, UnknownUpstreamError,
                NoResultsError, BadResultError, UnknownNameError):
        assert issubclass(cls, SpeechbenchError), cls
    assert str(UnknownNameError("unknown task 'x'; available: ks")) == "unknown task 'x'; available: ks"
