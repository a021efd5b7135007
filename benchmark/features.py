"""Where a task's training batches come from when they are not read from the feature cache.

A feature source maps utterance indices to ``(hidden, lengths)`` (``get(indices, draw, part)``: ``part`` is a rank's
slice of a torchrun micro-batch, see :mod:`speechbench.benchmark.train`):
- ``OnTheFlyFeatures``: loads audio and runs the upstream for every batch -> ``[B, L, T, D]`` + frame lengths ``[B]``
  (what s3prl does at every training step);
- ``PooledFeatures``: per-layer time-means held in memory (from ``benchmark.cache``) -> ``[B, L, D]``,
  ``lengths=None``. Exact for the utterance-level heads (see ``downstreams.heads.UtteranceLevelHead``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from speechbench.downstreams.data import Utterance, collate_audio, load_utterance_audio
from speechbench.runtime import Runtime, low_precision_weights
from speechbench.upstreams.base import Upstream

log = logging.getLogger("speechbench")

# Padded audio seconds per extraction batch (bench extract, the feature cache), by device type; measured with
# tests/benchmarks/bench_extract.py. On a CPU a batch costs its padded length, and batching buys no parallelism
# that one utterance's matrix products do not already give the cores: small length buckets (short clips together,
# long utterances alone) are fastest. A GPU needs big batches to fill its cores.
BATCH_POLICY_S = {"cpu": 16.0, "cuda": 160.0}


def extraction_batch_s(device: torch.device | None = None) -> float:
    """The batch policy of ``device``: padded audio seconds per extraction batch (:data:`BATCH_POLICY_S`)."""
    return BATCH_POLICY_S.get(device.type if device is not None else "cpu", BATCH_POLICY_S["cpu"])


def load_waves(utts: Sequence[Utterance], audio_root: Path | None, sample_rate: int, crop_s: float | None = None,
               rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """The audio of ``utts``; with ``crop_s``, audio longer than that is cut to a random ``crop_s`` window whose
    offset is drawn from ``rng`` (in the order of ``utts``, one draw per utterance that is longer)."""
    waves = [load_utterance_audio(u, audio_root, sample_rate) for u in utts]
    if crop_s is not None:
        size = int(crop_s * sample_rate)
        waves = [w if w.shape[0] <= size else w[(o := int(rng.integers(0, w.shape[0] - size + 1))): o + size]
                 for w in waves]
    return waves


def upstream_forward(upstream: Upstream, waves: Sequence[np.ndarray], runtime: Runtime | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``waves`` and run the frozen upstream on the runtime's device and precision (autocast): ``hidden
    [B, L, T, D]`` on that device (float32 for fp32; bf16/fp16 where autocast left it so) and ``lengths [B]``.

    Call it under ``torch.inference_mode()``: the outputs are then inference tensors, fine for reductions and
    storage (the feature cache) but not for autograd; :func:`run_upstream` returns ordinary tensors.
    """
    runtime = runtime or Runtime()
    wavs, wav_lengths = collate_audio(waves)
    with runtime.autocast(), low_precision_weights(upstream, runtime.precision):
        out = upstream(wavs.to(runtime.device, non_blocking=True), wav_lengths.to(runtime.device))
    hidden = out.hidden if torch.is_tensor(out.hidden) else torch.stack(list(out.hidden), dim=1)
    return hidden, out.lengths.to(hidden.device)


def upstream_hidden(upstream: Upstream, utts: Sequence[Utterance], audio_root: Path | None,
                    crop_s: float | None = None, rng: np.random.Generator | None = None,
                    runtime: Runtime | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load and pad the audio of ``utts`` (optionally cropped, :func:`load_waves`), run the frozen upstream
    (:func:`upstream_forward`): ``hidden [B, L, T, D]``, ``lengths [B]``."""
    return upstream_forward(upstream, load_waves(utts, audio_root, upstream.sample_rate, crop_s, rng), runtime)


def run_upstream(upstream: Upstream, utts: Sequence[Utterance], audio_root: Path | None,
                 crop_s: float | None = None, rng: np.random.Generator | None = None,
                 runtime: Runtime | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`upstream_hidden` under inference mode, as ordinary float32 tensors the training loop can use."""
    return _trainable(upstream, load_waves(utts, audio_root, upstream.sample_rate, crop_s, rng), runtime)


def _trainable(upstream: Upstream, waves: Sequence[np.ndarray], runtime: Runtime | None,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        hidden, lengths = upstream_forward(upstream, waves, runtime)
    # inference tensors cannot enter autograd; a copy outside inference mode is an ordinary tensor
    return hidden.float() if hidden.dtype != torch.float32 else hidden.clone(), lengths.clone()


class OnTheFlyFeatures:
    """Upstream forward at every request (optionally on random training crops of ``crop_s`` seconds), on the
    runtime's device and precision.

    Crops are drawn from a generator seeded by ``(seed, draw)``, where ``draw`` is the training loop's
    micro-batch index, so a resumed run crops exactly as an uninterrupted one, and every rank of a torchrun job crops
    its part of a micro-batch as one process crops the whole of it.
    """

    def __init__(self, upstream: Upstream, utts: Sequence[Utterance], audio_root: Path | None,
                 crop_s: float | None = None, seed: int = 0, runtime: Runtime | None = None):
        self.upstream, self.utts, self.audio_root = upstream, list(utts), audio_root
        self.crop_s, self.seed, self.runtime = crop_s, seed, runtime

    def __len__(self) -> int:
        return len(self.utts)

    @property
    def durations_s(self) -> list[float]:
        return [u.duration_s for u in self.utts]

    def get(self, indices: Sequence[int], draw: int = 0, part: slice | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features of ``indices[part]`` (all of them without ``part``), cropped as the whole of ``indices``."""
        part = part or slice(None)
        if self.crop_s:  # the crop offsets of the whole micro-batch, in its order, then this part of it
            utts = [self.utts[i] for i in indices]
            rng = np.random.default_rng([self.seed, draw])
            waves = load_waves(utts, self.audio_root, self.upstream.sample_rate, self.crop_s, rng)[part]
        else:
            waves = load_waves([self.utts[i] for i in list(indices)[part]], self.audio_root,
                               self.upstream.sample_rate)
        return _trainable(self.upstream, waves, self.runtime)


class PooledFeatures:
    """Per-layer time-means ``[N, L, D]`` held in memory (on the device they are given on)."""

    def __init__(self, pooled: torch.Tensor):
        self.pooled = pooled

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def get(self, indices: Sequence[int], draw: int = 0, part: slice | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.pooled[list(indices)[part or slice(None)]], None
