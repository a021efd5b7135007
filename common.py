"""The torch-free basics every speechbench package shares: errors, atomic writes, hashing, locations, threads.

This is the bottom layer: it imports nothing from speechbench and nothing heavier than the standard library, so
``speechbench.leaderboard`` (which never imports torch) and ``speechbench.upstreams`` (which imports nothing from
the other packages) can both use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SAMPLE_RATE = 16000  # Hz: the input rate of every built-in upstream and of the synthetic corpus


class SpeechbenchError(Exception):
    """A problem with the user's input (data, config, checkpoint, command), not a bug in speechbench.

    The CLI prints it as one line and exits with code 2; every other exception is a bug and shows its traceback.
    Messages name the file or option concerned and what to do.
    """


class UnknownNameError(SpeechbenchError, KeyError):
    """A registry lookup that missed (task, upstream, family, objective); the message lists what is available."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TrainingDivergedError(SpeechbenchError, FloatingPointError):
    """The loss became NaN or infinite (usually a learning rate that is too high for this upstream)."""


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes: a temporary file beside the target, flushed to disk, then renamed over it
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; once the body has written it, fsync it and rename it into
    place. On any failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically (temporary file, fsync, rename)."""
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# Hashing
# ---------------------------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------------------------------------------


def cache_root(*parts: str) -> Path:
    """speechbench's cache directory, or a sub-directory of it (``cache_root("features")``).

    ``$SPEECHBENCH_CACHE`` if set, else ``$XDG_CACHE_HOME/speechbench``, else ``~/.cache/speechbench``. It holds
    ``synth/`` (the synthetic corpus), ``features/`` (the feature cache) and ``checkpoints/`` (downloaded files).
    Always an absolute path (a relative ``$SPEECHBENCH_CACHE`` is taken from the working directory).
    """
    base = os.environ.get("SPEECHBENCH_CACHE")
    if base:
        root = Path(base).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "speechbench"
    # absolute, so that paths recorded under it (corpus roots, manifests) do not depend on the working directory
    return root.absolute().joinpath(*parts)


PATH_OPTION = "speechbench_path"  # dataclass field metadata key marking a path option (see path_option)
PATH_KEYWORDS = "speechbench_path_keywords"  # values of a path option that are not paths


def path_option(default: str | tuple[str, ...] | None = None, relative_to: str = "cwd",
                keywords: tuple[str, ...] = (), metadata: dict | None = None) -> dataclasses.Field:
    """A config dataclass field that holds a file or folder path (``str | None``).

    The runner resolves every such field to an absolute path once, when the config is built
    (``speechbench.benchmark.config.resolve_paths``), so a relative path means the same wherever it is used and the
    resolved path is what ``config.yaml`` and ``result.json`` record. ``relative_to`` says what a relative value is
    relative to: ``"cwd"`` (the working directory) or ``"data_root"`` (``data.root``; left as it is when there is no
    data root, i.e. on the synthetic corpus). A tuple of paths is resolved item by item; ``keywords`` are values that
    are not paths and stay as they are (PR's ``lexicon: cmudict``). ``metadata`` adds other field metadata (the
    protocol role of the option).
    """
    if relative_to not in ("cwd", "data_root"):
        raise ValueError(f"relative_to must be 'cwd' or 'data_root', got {relative_to!r}")
    return dataclasses.field(default=default, metadata={**(metadata or {}), PATH_OPTION: relative_to,
                                                        PATH_KEYWORDS: tuple(keywords)})


HF_PREFIX = "hf:"  # a data root ``hf:<where>``: a Hugging Face dataset (see speechbench.downstreams.hf_data)


def hf_location(root: str | os.PathLike | None) -> str | None:
    """``<where>`` of a data root written ``hf:<where>`` (a dataset folder or a hub id), else None."""
    text = str(root) if root is not None else ""
    return text[len(HF_PREFIX):] if text.startswith(HF_PREFIX) else None


def is_local_hf_location(where: str) -> bool:
    """Whether ``<where>`` of ``hf:<where>`` names a folder (one that exists, or one written as a path: absolute,
    ``./``, ``../`` or ``~``) rather than a hub id such as ``superb:ks`` or ``google/speech_commands:v0.01``."""
    return where.startswith(("/", ".", "~")) or Path(where).expanduser().exists()


def data_root_env() -> Path | None:
    """``$SPEECHBENCH_DATA_ROOT``: the folder that holds the real corpora (one sub-folder per corpus), or None."""
    value = os.environ.get("SPEECHBENCH_DATA_ROOT")
    return Path(value).expanduser().resolve() if value else None


# ---------------------------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------------------------


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup v2 (``cpu.max``) or v1 (``cfs_quota_us``/``cfs_period_us``) quota, or None."""
    candidates = [("/sys/fs/cgroup/cpu.max", None),
                  ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
                  ("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us")]
    for quota_file, period_file in candidates:
        try:
            if period_file is None:
                quota, period = Path(quota_file).read_text().split()[:2]
            else:
                quota, period = Path(quota_file).read_text().strip(), Path(period_file).read_text().strip()
        except (OSError, ValueError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            return int(quota) / int(period)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers, Slurm)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        count = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, int(limit)))
    return max(1, count)


def default_threads() -> int:
    """Torch intra-op threads: ``$SPEECHBENCH_THREADS``, else :func:`usable_cpus` shared among the processes that
    torchrun starts on this node (``LOCAL_WORLD_SIZE``), so that N processes do not fight over the cores."""
    value = os.environ.get("SPEECHBENCH_THREADS")
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise SpeechbenchError(f"SPEECHBENCH_THREADS={value!r}: expected a positive integer") from None
        if threads < 1:
            raise SpeechbenchError(f"SPEECHBENCH_THREADS={value!r}: expected a positive integer")
        return threads
    try:
        local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    except ValueError:
        local_processes = 1
    return max(1, usable_cpus() // local_processes)
