"""Where and how a command computes: device, precision, processes (torchrun), progress and resources.

The torch half of the bottom layer (:mod:`speechbench.common` is the torch-free half): it imports nothing from the
other speechbench packages, so ``upstreams`` (the pretraining loop) and ``benchmark`` both use it.

- **Device**: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``
  (:func:`resolve_device`); asking for CUDA where there is none is a one-line :class:`DeviceError`.
- **Precision**: ``fp32``, or ``bf16``/``fp16`` through :func:`torch.autocast` (:meth:`Runtime.autocast`). fp32 on
  CUDA means fp32: TF32 matrix products and convolutions are turned off (:func:`make_runtime`).
- **Processes**: under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`init_distributed` starts the
  process group (``nccl`` on CUDA, ``gloo`` on the CPU; rank ``r`` uses ``cuda:LOCAL_RANK``); without it nothing
  distributed is touched and the collectives below are no-ops.
- **Progress**: :class:`Progress` is a tqdm bar on a terminal and a log line with the rate and ETA every
  ``interval_s`` elsewhere (log files, Slurm), shown by rank 0 only.
- **Resources**: peak RSS (``resource.getrusage``), CUDA max allocated, and wall time per phase (:class:`Phases`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from speechbench.common import SpeechbenchError

log = logging.getLogger("speechbench")

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"


class DeviceError(SpeechbenchError):
    """A device or precision this machine cannot give (``--device cuda`` without CUDA, bf16 on an old GPU, ...)."""


# ---------------------------------------------------------------------------------------------------------------
# Processes (torchrun)
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_env() -> Dist:
    """The rank, world size and local rank torchrun puts in the environment (``Dist()`` without them)."""
    try:
        return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise DeviceError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun job: start the process group once (``nccl`` on CUDA, ``gloo`` on the CPU). Without
    torchrun (``WORLD_SIZE`` unset or 1) nothing happens. The timeout (``SPEECHBENCH_DIST_TIMEOUT_MIN``, default 120
    minutes) bounds how long a rank waits for the others, e.g. while they extract their share of a feature cache."""
    dist = dist_env()
    if not dist.enabled or _initialized():
        return dist
    if not torch.distributed.is_available():
        raise DeviceError("this torch build has no torch.distributed: run without torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    minutes = float(os.environ.get("SPEECHBENCH_DIST_TIMEOUT_MIN", 120))
    kwargs: dict[str, Any] = {"timeout": timedelta(minutes=minutes)}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    torch.distributed.init_process_group(backend, **kwargs)
    log.info("torchrun: rank %d of %d, backend %s, device %s", dist.rank, dist.world_size, backend, device)
    return dist


def shutdown_distributed() -> None:
    if _initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if _initialized():
        torch.distributed.barrier()


def all_gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` without torchrun). Objects are pickled: keep them small."""
    if not _initialized():
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a tensor (the tensor itself without torchrun)."""
    if _initialized():
        value = value.clone()
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
    return value


def rank_slice(n: int, dist: Dist) -> slice:
    """This rank's contiguous part of ``n`` items: sizes differ by at most one, lower ranks take the larger parts
    (as ``numpy.array_split``); empty when ``n`` < world size for the last ranks."""
    base, extra = divmod(n, dist.world_size)
    start = dist.rank * base + min(dist.rank, extra)
    return slice(start, start + base + (dist.rank < extra))


# ---------------------------------------------------------------------------------------------------------------
# Device and precision
# ---------------------------------------------------------------------------------------------------------------


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    return "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)"


def parse_device(spec: str | None) -> tuple[str, int | None]:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> ``(kind, index)``; anything else is a :class:`DeviceError`.
    Only the spelling is checked: whether this machine has the device is :func:`resolve_device`'s business."""
    text = (spec or "auto").strip().lower()
    if text in ("auto", "cpu"):
        return text, None
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise DeviceError(f"device {spec!r}: expected {DEVICE_HELP}")
    return "cuda", None if match.group(1) is None else int(match.group(1))


def resolve_device(spec: str | None = "auto", dist: Dist | None = None) -> torch.device:
    """A device spec (:func:`parse_device`) -> a torch device of this machine. Under torchrun, ``cuda`` (and
    ``auto`` on a GPU machine) is ``cuda:LOCAL_RANK``: one GPU per process."""
    dist = dist or dist_env()
    kind, index = parse_device(spec)
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec}: CUDA is not available: {_no_cuda_reason()}; use --device cpu (or auto)")
    if index is not None and dist.enabled:
        raise DeviceError(f"device {spec}: under torchrun use --device cuda (rank r runs on cuda:LOCAL_RANK)")
    if index is None:
        index = dist.local_rank if dist.enabled else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device cuda:{index}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


def check_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise DeviceError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise DeviceError("precision fp16 is for CUDA devices: on the CPU PyTorch lacks float16 kernels for some "
                          "layers (oneDNN's LSTM) and emulates the others; use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use fp16 "
                          "or fp32")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bf16/fp16 on ``device``; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


_LOW_PRECISION_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


@contextlib.contextmanager
def low_precision_weights(module: Any, precision: str) -> Iterator[None]:
    """For a frozen module's forward under :func:`autocast`: the weights and biases of its linear and convolution
    layers are swapped for copies in the autocast dtype, made once and kept with the module.

    Autocast casts exactly these tensors to that dtype at every call (it caches only tensors that require grad), so
    the outputs are bitwise the same, minus a cast of every weight at every forward (about 10 % of a bf16 forward of
    a Base HuBERT on a CPU). A module with trainable parameters, or fp32, is left alone."""
    if precision == "fp32" or not isinstance(module, torch.nn.Module) or \
            any(p.requires_grad for p in module.parameters()):
        yield
        return
    from torch.nn.utils import parametrize

    dtype = AUTOCAST_DTYPES[precision]
    cache = module.__dict__.setdefault("_speechbench_low_precision", {})
    swaps = cache.get(dtype)
    if swaps is None or any(copy.device != param.device for param, copy in swaps):
        with torch.inference_mode(False):  # copies that may become a parameter's data outside inference mode
            swaps = cache[dtype] = [
                (param, param.detach().to(dtype)) for layer in module.modules()
                if isinstance(layer, _LOW_PRECISION_LAYERS) and not parametrize.is_parametrized(layer)
                for param in (layer._parameters.get("weight"), layer._parameters.get("bias"))
                if param is not None and param.dtype == torch.float32]
    originals = [param.data for param, _ in swaps]
    try:
        for param, copy in swaps:
            param.data = copy
        yield
    finally:
        for (param, _), original in zip(swaps, originals, strict=True):
            param.data = original


def machine_name() -> str:
    """A short description of this machine's processor (model name from /proc/cpuinfo where available)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else machine_name()


@dataclass(frozen=True)
class Runtime:
    """The device, precision and torchrun place a command computes with (the default: CPU, fp32, one process)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    dist: Dist = field(default_factory=Dist)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def record(self) -> dict:
        """What ``result.json`` records under ``runtime``: device, its name, precision, processes, threads, and the
        torch/CUDA build."""
        cuda = self.device.type == "cuda"
        return {"device": str(self.device), "device_name": device_name(self.device), "precision": self.precision,
                "world_size": self.dist.world_size,
                "backend": torch.distributed.get_backend() if _initialized() else None,
                "threads": torch.get_num_threads(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if cuda else None,
                "tf32": (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32) if cuda else None}


def make_runtime(device: str | None = "auto", precision: str = "fp32") -> Runtime:
    """Resolve a device spec and precision, join the torchrun job if there is one, and return the Runtime.

    fp32 on CUDA turns TF32 off (PyTorch leaves it on for cuDNN convolutions), so that fp32 is fp32 everywhere.
    """
    dist = dist_env()
    resolved = resolve_device(device, dist)
    check_precision(precision, resolved)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
        if precision == "fp32":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    return Runtime(resolved, precision, init_distributed(resolved))


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (alone, or in lists and tuples) moved to ``device``; anything else unchanged."""
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if type(value) is tuple:
        return tuple(to_device(v, device) for v in value)
    return value


# ---------------------------------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (``getrusage``; Linux reports KB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def cuda_peak_mb(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` on ``device`` so far, in MB (None off CUDA)."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / (1024 * 1024), 1)


class Phases:
    """Wall seconds per named phase (``with phases("train"): ...``; a phase entered twice adds up)."""

    def __init__(self, device: torch.device | None = None):
        self.seconds: dict[str, float] = {}
        self.device = device

    def copy(self) -> Phases:
        twin = Phases(self.device)
        twin.seconds = dict(self.seconds)
        return twin

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # queued kernels belong to this phase
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def record(self, runtime: Runtime) -> dict:
        """``{"phases_s": {...}, "peak_rss_mb", "cuda_peak_allocated_mb"}``; under torchrun the largest peak over
        the ranks (a collective: every rank calls it)."""
        peaks = all_gather_objects((peak_rss_mb(), cuda_peak_mb(runtime.device)))
        cuda_peaks = [c for _, c in peaks if c is not None]
        return {"phases_s": {k: round(v, 2) for k, v in self.seconds.items()},
                "peak_rss_mb": max(r for r, _ in peaks),
                "cuda_peak_allocated_mb": max(cuda_peaks) if cuda_peaks else None}


# ---------------------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress of a long step with its rate and ETA, on stderr.

    A tqdm bar when stderr is a terminal; otherwise (a log file, a Slurm job) one log line at most every
    ``interval_s`` seconds (``SPEECHBENCH_PROGRESS_S``, default 60) and one at the end. Only rank 0 of a torchrun
    job shows anything, and ``enabled=False`` silences it.
    """

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, enabled: bool = True,
                 interval_s: float | None = None):
        from tqdm import tqdm

        self.total, self.desc, self.unit, self.n, self.start_n = total, desc, unit, initial, initial
        self.enabled = enabled and dist_env().main
        self.interval_s = float(os.environ.get("SPEECHBENCH_PROGRESS_S", 60)) if interval_s is None else interval_s
        tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                        leave=False) if self.enabled and tty else None
        self.t0 = self.last = time.monotonic()
        self.postfix = ""

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.interval_s:
            self._log()

    def _log(self, final: bool = False) -> None:
        now = time.monotonic()
        self.last = now
        elapsed = now - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        when = f"in {_clock(elapsed)}" if final else (f"ETA {_clock(left)}" if left == left else "ETA ?")
        log.info("%s: %d/%d %s (%.0f%%), %.3g %s/s, %s%s", self.desc, self.n, self.total, self.unit, pct, rate,
                 self.unit, when, f"; {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.n > self.start_n and time.monotonic() - self.t0 >= self.interval_s:
            self._log(final=True)  # a step that took long enough to log at all says when it ended

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
