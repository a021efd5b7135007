"""The on-disk feature cache: a frozen upstream's outputs computed once per (checkpoint, audio, split).

Two granularities:
- ``pooled``: the masked time-mean of every layer, ``[L, D]`` float32 per utterance. Exact for the utterance-level
  SUPERB heads (linear -> mean -> linear), see ``downstreams.heads.UtteranceLevelHead``.
- ``frames``: every valid frame, ``[L, T, D]`` float16 per utterance, for frame-level heads (PR, ASR, ASV).

Layout: ``<cache_root>/<key>/shard-00000.safetensors`` (+ ``.json`` sidecar with size and sha256), ``index.json``
written last. The key hashes the upstream identity (name, checkpoint sha256, format, declared attributes), the
split's manifest rows, the granularity and the cache version, so a changed input never reads a stale cache.
Shards are written to a temporary file and renamed; a shard whose size or sha256 does not match its sidecar
(truncated, corrupted, interrupted) is rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from speechbench.benchmark.features import upstream_hidden
from speechbench.common import atomic_path, atomic_write_text, sha256_file
from speechbench.common import cache_root as common_cache_root
from speechbench.downstreams.data import Utterance, bucket_by_duration
from speechbench.upstreams.base import Upstream, describe_upstream

log = logging.getLogger("speechbench")

CACHE_VERSION = 1
SHARD_UTTERANCES = 256
GRANULARITIES = ("pooled", "frames")


def cache_root() -> Path:
    """``<speechbench cache>/features`` (see :func:`speechbench.common.cache_root`)."""
    return common_cache_root("features")


def upstream_identity(upstream: Upstream, name: str) -> dict:
    """What determines an upstream's outputs: its name, weights and declared attributes."""
    return {**describe_upstream(upstream), "name": name}


def feature_key(identity: dict, utts: Sequence[Utterance], audio_root: Path | None, split: str,
                granularity: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "upstream": identity, "split": split,
                         "granularity": granularity, "audio_root": str(audio_root)}, sort_keys=True).encode())
    for u in utts:
        h.update(json.dumps(u.to_row(), sort_keys=True).encode())
    return h.hexdigest()


def estimate_frames_bytes(utts: Sequence[Utterance], upstream: Upstream) -> int:
    """float16 bytes of a frames cache: sum of frames x L x D x 2."""
    frames = sum(int(u.duration_s * upstream.sample_rate) // upstream.downsample_rate + 1 for u in utts)
    return frames * upstream.num_layers * upstream.hidden_size * 2





def _shard_valid(shard: Path) -> bool:
    sidecar = shard.with_suffix(".json")
    if not shard.exists() or not sidecar.exists():
        return False
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return shard.stat().st_size == meta.get("size") and sha256_file(shard) == meta.get("sha256")


def _save_shard(tensors: dict[str, torch.Tensor], shard: Path) -> None:
    """Write the shard atomically, then its sidecar (size + sha256): a shard without a matching sidecar is
    never read."""
    with atomic_path(shard) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    atomic_write_text(shard.with_suffix(".json"), json.dumps({"size": shard.stat().st_size,
                                                              "sha256": sha256_file(shard)}))


def _extract_shard(upstream: Upstream, utts: Sequence[Utterance], audio_root: Path | None, granularity: str,
                   max_batch_s: float) -> dict[str, torch.Tensor]:
    """Run the upstream over one shard's utterances, in length buckets; keep manifest order in the output.

    Everything stays in inference mode (the shard is written to disk, never trained through), and each
    utterance is reduced from a view of its valid frames: no copy of the ``[B, L, T, D]`` batch is made.
    """
    pooled: list[torch.Tensor | None] = [None] * len(utts)
    frames: list[torch.Tensor | None] = [None] * len(utts)
    with torch.inference_mode():
        for batch in bucket_by_duration([u.duration_s for u in utts], max_batch_s):
            hidden, lengths = upstream_hidden(upstream, [utts[i] for i in batch], audio_root)
            for j, (i, n) in enumerate(zip(batch, lengths.tolist(), strict=True)):
                if granularity == "pooled":
                    pooled[i] = hidden[j, :, :n].float().mean(dim=1)  # [L, D]: time-mean of the valid frames
                else:
                    frames[i] = hidden[j, :, :n].permute(1, 0, 2).to(torch.float16)  # [T, L, D]
        if granularity == "pooled":
            return {"pooled": torch.stack(pooled)}
        lengths = torch.tensor([f.shape[0] for f in frames], dtype=torch.long)
        offsets = torch.zeros(len(frames) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        return {"frames": torch.cat(frames), "offsets": offsets}


class FeatureCache:
    """A complete, verified cache directory for one (upstream, split, granularity)."""

    def __init__(self, directory: Path, granularity: str, num_utterances: int):
        self.directory, self.granularity, self.num_utterances = directory, granularity, num_utterances
        self.shards = [directory / f"shard-{k:05d}.safetensors"
                       for k in range((num_utterances + SHARD_UTTERANCES - 1) // SHARD_UTTERANCES)]

    @classmethod
    def open_or_build(cls, upstream: Upstream, identity: dict, utts: Sequence[Utterance], audio_root: Path | None,
                      split: str, granularity: str, max_batch_s: float = 160.0,
                      root: Path | None = None) -> FeatureCache:
        """Reuse the cache for these inputs if it is complete and intact; build (or repair) it otherwise."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        key = feature_key(identity, utts, audio_root, split, granularity)
        directory = (root or cache_root()) / key[:32]
        directory.mkdir(parents=True, exist_ok=True)
        cache = cls(directory, granularity, len(utts))
        todo = [k for k, shard in enumerate(cache.shards) if not _shard_valid(shard)]
        if not todo and (directory / "index.json").exists():
            log.info("feature cache hit (%s, %s): %s", granularity, split, directory)
            return cache
        if len(todo) < len(cache.shards):
            log.info("feature cache %s: %d of %d shards missing or damaged, rebuilding them", directory,
                     len(todo), len(cache.shards))
        for k in tqdm(todo, desc=f"cache {split}", unit="shard", disable=None, leave=False):
            chunk = utts[k * SHARD_UTTERANCES: (k + 1) * SHARD_UTTERANCES]
            _save_shard(_extract_shard(upstream, chunk, audio_root, granularity, max_batch_s), cache.shards[k])
        atomic_write_text(directory / "index.json", json.dumps(
            {"version": CACHE_VERSION, "key": key, "granularity": granularity, "split": split,
             "num_utterances": len(utts), "shards": [s.name for s in cache.shards], "upstream": identity}, indent=1))
        return cache

    def load_pooled(self) -> torch.Tensor:
        """All pooled features ``[N, L, D]`` float32."""
        parts = []
        for shard in self.shards:
            with safe_open(str(shard), framework="pt") as f:
                parts.append(f.get_tensor("pooled"))
        return torch.cat(parts)

    def frames(self, frame_rate: float) -> CachedFrames:
        return CachedFrames(self.shards, frame_rate)


class CachedFrames:
    """Frame-level features read from memory-mapped shards: ``get(indices) -> ([B, L, T, D] float32, lengths [B])``.

    With ``crop_frames``, utterances longer than that are cut to a random window (seeded by ``(seed, draw)``).
    """

    def __init__(self, shards: Sequence[Path], frame_rate: float, crop_frames: int | None = None, seed: int = 0):
        self.frame_rate = frame_rate  # frames per second, to report durations for length bucketing
        self._files = [safe_open(str(s), framework="pt") for s in shards]
        self._offsets = [f.get_tensor("offsets") for f in self._files]
        self._frames = [f.get_slice("frames") for f in self._files]
        self.crop_frames, self.seed = crop_frames, seed
        self._lengths = torch.cat([o[1:] - o[:-1] for o in self._offsets])

    def __len__(self) -> int:
        return int(self._lengths.shape[0])

    @property
    def durations_s(self) -> list[float]:
        return (self._lengths.double() / self.frame_rate).tolist()

    def with_crop(self, crop_frames: int | None, seed: int) -> CachedFrames:
        twin = object.__new__(CachedFrames)
        twin.__dict__.update(self.__dict__)
        twin.crop_frames, twin.seed = crop_frames, seed
        return twin

    def _utterance(self, index: int) -> torch.Tensor:
        shard, local = divmod(index, SHARD_UTTERANCES)
        start, end = int(self._offsets[shard][local]), int(self._offsets[shard][local + 1])
        return self._frames[shard][start:end]  # [T, L, D] float16

    def get(self, indices: Sequence[int], draw: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self._utterance(i) for i in indices]
        if self.crop_frames:
            rng = np.random.default_rng([self.seed, draw])
            items = [x if x.shape[0] <= self.crop_frames else
                     x[(o := int(rng.integers(0, x.shape[0] - self.crop_frames + 1))): o + self.crop_frames]
                     for x in items]
        lengths = torch.tensor([x.shape[0] for x in items], dtype=torch.long)
        _, num_layers, d = items[0].shape
        out = torch.zeros(len(items), int(lengths.max()), num_layers, d)
        for j, x in enumerate(items):
            out[j, : x.shape[0]] = x.float()
        return out.permute(0, 2, 1, 3), lengths  # [B, L, T, D]
