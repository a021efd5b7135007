"""``bench check-upstream``: does an upstream honour the contract of ``upstreams.base``?

Checks, each printed as one PASS/FAIL line:

- ``attributes``: ``name``, ``sample_rate`` (16000), ``num_layers``, ``hidden_size``, ``downsample_rate`` declared
  as positive integers before any forward;
- ``shapes``: a padded batch gives ``hidden [B, L, T, D]`` with the declared L and D, ``lengths [B]`` integers and
  ``T == max(lengths)``;
- ``frame counts``: ``lengths`` follow the model's rule (its ``frame_lengths(wav_lengths)``, e.g. the conv
  arithmetic; without one, Kaldi ``snip_edges`` for 10 ms upstreams) and stay within a few frames of
  ``S / downsample_rate``;
- ``batch invariance``: batched and one-at-a-time outputs agree on every valid frame (max |diff| <= 1e-4 x scale);
- ``deterministic``: the same batch twice gives identical outputs (eval mode, no dropout);
- ``30 s input``: one 30-second utterance runs, with the right frame count;
- ``finite``: no NaN/inf anywhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from speechbench.common import SAMPLE_RATE
from speechbench.upstreams.base import (
    OPTIONAL_ATTRIBUTES,
    REQUIRED_ATTRIBUTES,
    Upstream,
    UpstreamContractError,
    describe_upstream,
)

TOLERANCE = 1e-4
BATCH_SECONDS = (2.05, 0.73, 1.31)


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"


def probe_signal(num_samples: int, seed: int, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """A deterministic speech-like test waveform ``[S]``: a few harmonics with vibrato plus noise, ~0.1 RMS."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples, dtype=torch.float64) / sample_rate
    f0 = 110.0 + 40.0 * torch.rand((), generator=g, dtype=torch.float64)
    phase = 2 * math.pi * (f0 * t + 3.0 * torch.sin(2 * math.pi * 4.0 * t))
    wav = sum(torch.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * torch.sin(2 * math.pi * 2.0 * t))
    wav = wav + 0.3 * torch.randn(num_samples, generator=g, dtype=torch.float64)
    return (0.1 * wav / wav.std().clamp_min(1e-8)).float()


def _forward(upstream: Upstream, wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        out = upstream(wavs, lengths)
        hidden = out.hidden if torch.is_tensor(out.hidden) else torch.stack(list(out.hidden), dim=1)
    return hidden, torch.as_tensor(out.lengths)


def _batch(sample_rate: int, seconds: tuple[float, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([round(s * sample_rate) for s in seconds])
    wavs = torch.zeros(len(seconds), int(lengths.max()))
    for i, n in enumerate(lengths.tolist()):
        wavs[i, :n] = probe_signal(n, seed + i, sample_rate)
    return wavs, lengths


def kaldi_frames(wav_lengths: torch.Tensor, frame_length: int = 400, frame_shift: int = 160) -> torch.Tensor:
    """Kaldi ``snip_edges`` frame count (25 ms / 10 ms at 16 kHz), at least 1."""
    return 1 + torch.div(wav_lengths.clamp_min(frame_length) - frame_length, frame_shift, rounding_mode="floor")


def _expected_frames(upstream: Upstream, wav_lengths: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    rule: Callable | None = getattr(upstream, "frame_lengths", None)
    if rule is not None:
        return torch.as_tensor(rule(wav_lengths)).long(), "the model's frame_lengths rule"
    if upstream.downsample_rate == 160:
        return kaldi_frames(wav_lengths), "Kaldi snip_edges 25/10 ms (no frame_lengths declared)"
    return None, "no frame_lengths rule declared; checked against S / downsample_rate only"


def _frames_ok(upstream: Upstream, wav_lengths: torch.Tensor, lengths: torch.Tensor) -> tuple[bool, str]:
    expected, how = _expected_frames(upstream, wav_lengths)
    approx = wav_lengths.double() / upstream.downsample_rate
    near = bool(((lengths.double() - approx).abs() <= 3).all())
    if expected is not None and not torch.equal(expected.cpu(), lengths.cpu().long()):
        return False, f"lengths {lengths.tolist()} != {how} {expected.tolist()} for {wav_lengths.tolist()} samples"
    if not near:
        return False, f"lengths {lengths.tolist()} are not ~ samples / {upstream.downsample_rate} = " \
                      f"{[round(a, 1) for a in approx.tolist()]}"
    return True, f"{lengths.tolist()} frames for {wav_lengths.tolist()} samples ({how})"


def _run_check(name: str, fn: Callable[[], tuple[bool, str]]) -> CheckResult:
    try:
        ok, detail = fn()
    except Exception as e:  # a crash is a failed check, reported on its line
        text = str(e).strip()
        ok, detail = False, f"raised {type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"
    return CheckResult(name, ok, detail)


def check_upstream(upstream: Upstream, long_seconds: float = 30.0, seed: int = 0) -> list[CheckResult]:
    """Run every contract check on a built upstream; returns one result per check (never raises)."""
    results: list[CheckResult] = []

    def attributes() -> tuple[bool, str]:
        try:
            record = describe_upstream(upstream)
        except UpstreamContractError as e:
            return False, str(e)
        if record["sample_rate"] != SAMPLE_RATE:
            return False, f"sample_rate {record['sample_rate']} (every task feeds {SAMPLE_RATE} Hz audio)"
        return True, ", ".join(f"{k}={record[k]}" for k in REQUIRED_ATTRIBUTES)

    results.append(_run_check("attributes", attributes))
    if not results[-1].ok:
        return results
    sr = upstream.sample_rate
    wavs, wav_lengths = _batch(sr, BATCH_SECONDS, seed)
    state: dict = {}

    def shapes() -> tuple[bool, str]:
        hidden, lengths = _forward(upstream, wavs, wav_lengths)
        state["hidden"], state["lengths"] = hidden, lengths
        b, n_layers, t, d = hidden.shape
        expect = (len(BATCH_SECONDS), upstream.num_layers, upstream.hidden_size)
        if (b, n_layers, d) != expect or lengths.shape != (b,) or lengths.dtype.is_floating_point:
            return False, f"hidden {tuple(hidden.shape)}, lengths {tuple(lengths.shape)} {lengths.dtype}; " \
                          f"expected [B={expect[0]}, L={expect[1]}, T, D={expect[2]}] and [B] integers"
        if t != int(lengths.max()):
            return False, f"T = {t} but the longest utterance has {int(lengths.max())} valid frames"
        return True, f"hidden [B, L, T, D] = {list(hidden.shape)}"

    results.append(_run_check("shapes", shapes))
    if not results[-1].ok:
        return results
    results.append(_run_check("frame counts", lambda: _frames_ok(upstream, wav_lengths, state["lengths"])))

    def invariance() -> tuple[bool, str]:
        hidden, lengths = state["hidden"], state["lengths"]
        worst, scale = 0.0, float(hidden.abs().max().clamp_min(1.0))
        for i, n in enumerate(wav_lengths.tolist()):
            single, single_len = _forward(upstream, wavs[i: i + 1, :n], wav_lengths[i: i + 1])
            k = int(lengths[i])
            if int(single_len[0]) != k:
                return False, f"utterance {i}: {int(single_len[0])} frames alone, {k} in the batch"
            worst = max(worst, float((single[0, :, :k] - hidden[i, :, :k]).abs().max()))
        ok = worst <= TOLERANCE * scale
        return ok, f"max |batched - alone| = {worst:.2e} on valid frames (tolerance {TOLERANCE * scale:.1e})"

    results.append(_run_check("batch invariance", invariance))

    def deterministic() -> tuple[bool, str]:
        again, _ = _forward(upstream, wavs, wav_lengths)
        diff = float((again - state["hidden"]).abs().max())
        return diff == 0.0, "identical on a second run" if diff == 0.0 else f"differs by {diff:.2e} on a second run"

    results.append(_run_check("deterministic", deterministic))

    def long_input() -> tuple[bool, str]:
        n = round(long_seconds * sr)
        t0 = time.perf_counter()
        hidden, lengths = _forward(upstream, probe_signal(n, seed + 7, sr)[None], torch.tensor([n]))
        state["long"] = hidden
        ok, detail = _frames_ok(upstream, torch.tensor([n]), lengths)
        if ok and hidden.shape[2] != int(lengths[0]):
            ok, detail = False, f"T = {hidden.shape[2]} but lengths = {int(lengths[0])}"
        return ok, f"{long_seconds:g} s in {time.perf_counter() - t0:.2f} s: {detail}"

    results.append(_run_check(f"{long_seconds:g} s input", long_input))

    def finite() -> tuple[bool, str]:
        tensors = [state[k] for k in ("hidden", "long") if k in state]
        bad = [int((~torch.isfinite(t)).sum()) for t in tensors]
        return sum(bad) == 0, "all outputs finite" if sum(bad) == 0 else f"{sum(bad)} non-finite values"

    results.append(_run_check("finite", finite))
    return results


def run_check(name_or_path: str, ckpt: str | None = None, trust_checkpoint: bool = False,
              long_seconds: float = 30.0, printer: Callable[[str], None] = print) -> bool:
    """Build an upstream by name/path, run every check, print one line per check; True when all pass."""
    from speechbench.upstreams.registry import build_upstream

    upstream = build_upstream(name_or_path, ckpt=ckpt, trust_checkpoint=trust_checkpoint)
    fmt = getattr(upstream, "checkpoint_format", OPTIONAL_ATTRIBUTES["checkpoint_format"])  # before the contract check
    printer(f"checking {getattr(upstream, 'name', type(upstream).__name__)} (format {fmt})")
    results = check_upstream(upstream, long_seconds)
    for r in results:
        printer(r.line())
    failed = [r.name for r in results if not r.ok]
    printer(f"{'FAIL' if failed else 'PASS'}: {len(results) - len(failed)}/{len(results)} checks passed"
            + (f" (failed: {', '.join(failed)})" if failed else ""))
    return not failed
