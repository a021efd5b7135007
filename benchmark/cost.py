"""Measured cost of an upstream: parameters, GFLOPs per audio second, and extraction real-time factor.

Counted, not declared: the FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass of a
fixed input (``seconds`` of seeded noise, batch 1), so they are what the model actually computes on this input.
FlopCounterMode counts the matrix products and convolutions (2 FLOPs per multiply-add); element-wise work,
normalisation and the FFT of filterbank front ends are not counted. It also does not see inside a recurrent kernel
that PyTorch runs as one op (the LSTM of CPC), so :data:`FLOP_FORMULAS` adds a formula for those: the matrix products
of every gate, ``2 * frames * sum(weight matrix sizes)`` (GRUs decompose into counted matrix products by themselves),
and one for the CPU attention kernel, which torch counts on CUDA only.

The real-time factor is wall seconds of upstream compute per second of audio (lower is faster; 0.01 = 100x real
time), the median of ``repeats`` timed forward passes after one warm-up, on the device and precision given, with the
torch thread count recorded. It depends on the machine and on what else runs on it.

:func:`upstream_cost` caches one measurement per (upstream record, input length, device, precision) under
``cache_root("cost")``; ``bench run`` records it in every ``result.json`` (``cost``) so that the torch-free
leaderboard can show cost columns.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from speechbench.common import atomic_write_text, cache_root, sha256_text
from speechbench.runtime import PRECISIONS, autocast, low_precision_weights, machine_name
from speechbench.upstreams.base import describe_upstream

log = logging.getLogger("speechbench")

COST_VERSION = 2  # bump when what is measured changes: cached measurements of another version are ignored


def _rnn_flops(input_shape, *args, **kwargs) -> int:
    """FLOPs of ``aten.{lstm,gru,rnn_tanh,rnn_relu}``: every weight matrix (``[gates * H, in]``, ``[gates * H, H]``,
    projections) is applied once per frame, ``2 * frames * sum(rows * cols)``.

    Tensors arrive as their shapes. The overloads are ``.input(input [B, T, in] or [T, B, in], hx, params, ...)`` and
    ``.data(data [frames, in], batch_sizes, hx, params, ...)`` (packed sequences); ``hx`` is one tensor (GRU, RNN)
    or a list (LSTM), so ``params`` is the last list argument."""
    params = [a for a in args if isinstance(a, (list, tuple)) and not isinstance(a, torch.Size)][-1]
    frames = int(input_shape[0]) * (int(input_shape[1]) if len(input_shape) == 3 else 1)
    return 2 * frames * sum(int(s[0]) * int(s[1]) for s in params if len(s) == 2)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs of the CPU attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``): its two matrix
    products, as torch counts them for the CUDA kernels (``sdpa_flop_count``)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode decomposes an op that is not in its registry (the LSTM becomes CPU ``mkldnn_rnn_layer`` kernels,
# which it does not count) and counts by overload packet. Registering the overloads keeps it from decomposing the
# recurrent op, registering the packet makes it count it, so an RNN is counted by this one formula on every device.
# torch counts the CUDA attention kernels but not the CPU one, which transformers' SDPA attention runs here.
FLOP_FORMULAS = {key: _rnn_flops for op in (torch.ops.aten.lstm, torch.ops.aten.gru, torch.ops.aten.rnn_tanh,
                                            torch.ops.aten.rnn_relu) for key in (op, op.input, op.data)}
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
FLOP_FORMULAS.update({_CPU_SDPA: _cpu_sdpa_flops, _CPU_SDPA.default: _cpu_sdpa_flops})


def count_flops(forward: Callable[[], object]) -> int:
    """FLOPs of one call of ``forward()`` (matrix products, convolutions, recurrent layers and attention), the one
    counter behind result costs and the cards' ``gflops_per_s``."""
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    # under inference mode: with autograd on or in no_grad, a CPU LSTM dispatches to kernels the counter never sees
    with counter, torch.inference_mode():
        forward()
    return counter.get_total_flops()


def measure_cost(upstream, seconds: float = 10.0, device: str | torch.device = "cpu", precision: str = "fp32",
                 repeats: int = 3) -> dict:
    """Measure ``upstream`` (built, frozen) on a fixed ``seconds``-long input; return a plain dict:

    ``params`` (count), ``gflops_per_audio_s``, ``rtf`` (compute seconds per audio second), ``input_s``,
    ``device``, ``precision`` (``fp32``, or ``bf16``/``fp16`` under ``torch.autocast``), ``threads``, ``machine``,
    ``torch`` (version), ``measured_at`` (UTC), ``version`` (:data:`COST_VERSION`).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    device = torch.device(device)
    params = sum(p.numel() for p in upstream.parameters()) if isinstance(upstream, torch.nn.Module) else 0
    samples = int(round(seconds * upstream.sample_rate))
    wavs = 0.1 * torch.randn(1, samples, generator=torch.Generator().manual_seed(0))
    wavs, lengths = wavs.to(device), torch.tensor([samples], device=device)

    def forward(in_precision: str) -> None:
        with torch.inference_mode(), autocast(device, in_precision), low_precision_weights(upstream, in_precision):
            upstream(wavs, lengths)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # the FLOPs do not depend on the precision, and the counter decomposes recurrent layers below autocast (where
    # nothing would cast their inputs): count in fp32, time in the precision asked for
    flops = count_flops(lambda: forward("fp32"))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(precision)
        times.append(time.perf_counter() - t0)
    return {
        "params": int(params), "gflops_per_audio_s": flops / 1e9 / seconds,
        "rtf": statistics.median(times) / seconds, "input_s": float(seconds), "device": str(device),
        "precision": precision, "threads": torch.get_num_threads(), "machine": machine_name(),
        "torch": torch.__version__, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": COST_VERSION,
    }


def upstream_cost(upstream, seconds: float = 10.0, device: str | torch.device = "cpu",
                  precision: str = "fp32") -> dict:
    """:func:`measure_cost`, measured once per (``describe_upstream()`` record, seconds, device, precision) and cached
    as JSON under ``cache_root("cost")``; later calls (and later runs) read the cached measurement."""
    key = sha256_text(json.dumps({"upstream": describe_upstream(upstream), "seconds": seconds, "device": str(device),
                                  "precision": precision, "version": COST_VERSION}, sort_keys=True, default=str))
    path = cache_root("cost") / f"{key[:32]}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("%s: unreadable cost measurement, measuring again", path)
    t0 = time.perf_counter()
    cost = measure_cost(upstream, seconds, device, precision)
    atomic_write_text(path, json.dumps(cost, indent=2) + "\n")
    log.info("cost of %s: %.2f M parameters, %.3f GFLOPs per audio second, real-time factor %.4f on %s %s "
             "(measured in %.1f s)", upstream.name, cost["params"] / 1e6, cost["gflops_per_audio_s"], cost["rtf"],
             cost["device"], precision, time.perf_counter() - t0)
    return cost
