"""Where a task's training batches come from when they are not read from the feature cache.

A feature source maps utterance indices to ``(hidden, lengths)``:
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
from speechbench.upstreams.base import Upstream

log = logging.getLogger("speechbench")


def upstream_hidden(upstream: Upstream, utts: Sequence[Utterance], audio_root: Path | None,
                    crop_s: float | None = None, rng: np.random.Generator | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Load and pad the audio of ``utts``, run the frozen upstream: ``hidden [B, L, T, D]``, ``lengths [B]``.

    With ``crop_s``, audio longer than that is cut to a random ``crop_s`` window drawn from ``rng``.
    Call it under ``torch.inference_mode()``: the outputs are then inference tensors, fine for reductions and
    storage (the feature cache) but not for autograd; :func:`run_upstream` returns ordinary tensors.
    """
    waves = [load_utterance_audio(u, audio_root, upstream.sample_rate) for u in utts]
    if crop_s is not None:
        size = int(crop_s * upstream.sample_rate)
        waves = [w if w.shape[0] <= size else w[(o := int(rng.integers(0, w.shape[0] - size + 1))): o + size]
                 for w in waves]
    wavs, wav_lengths = collate_audio(waves)
    out = upstream(wavs, wav_lengths)
    hidden = out.hidden if torch.is_tensor(out.hidden) else torch.stack(list(out.hidden), dim=1)
    return hidden, out.lengths


def run_upstream(upstream: Upstream, utts: Sequence[Utterance], audio_root: Path | None,
                 crop_s: float | None = None, rng: np.random.Generator | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`upstream_hidden` under inference mode, as ordinary tensors the training loop can use."""
    with torch.inference_mode():
        hidden, lengths = upstream_hidden(upstream, utts, audio_root, crop_s, rng)
    # inference tensors cannot enter autograd; a clone outside inference mode is an ordinary tensor
    return hidden.clone(), lengths.clone()


class OnTheFlyFeatures:
    """Upstream forward at every request (optionally on random training crops of ``crop_s`` seconds).

    Crops are drawn from a generator seeded by ``(seed, draw)``, where ``draw`` is the training loop's
    micro-batch index, so a resumed run crops exactly as an uninterrupted one.
    """

    def __init__(self, upstream: Upstream, utts: Sequence[Utterance], audio_root: Path | None,
                 crop_s: float | None = None, seed: int = 0):
        self.upstream, self.utts, self.audio_root = upstream, list(utts), audio_root
        self.crop_s, self.seed = crop_s, seed

    def __len__(self) -> int:
        return len(self.utts)

    @property
    def durations_s(self) -> list[float]:
        return [u.duration_s for u in self.utts]

    def get(self, indices: Sequence[int], draw: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        rng = np.random.default_rng([self.seed, draw]) if self.crop_s else None
        return run_upstream(self.upstream, [self.utts[i] for i in indices], self.audio_root, self.crop_s, rng)


class PooledFeatures:
    """Per-layer time-means ``[N, L, D]`` held in memory."""

    def __init__(self, pooled: torch.Tensor):
        self.pooled = pooled

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def get(self, indices: Sequence[int], draw: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.pooled[list(indices)], None
