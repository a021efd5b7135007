"""The on-disk feature cache: a frozen upstream's outputs, computed once per (upstream, audio, precision).

**Keys.** One entry per utterance, found by
- the upstream: :func:`upstream_identity` (``describe_upstream()``: name, declared sizes, family, checkpoint format
  and sha256, settings; plus the run's upstream label when there is no checkpoint sha256 to tell two weight sets
  apart) and the precision the upstream ran in (``fp32``, ``bf16`` or ``fp16`` autocast) -> one directory per
  upstream and precision;
- the audio: its resolved path, size and modification time (or, with ``SPEECHBENCH_CACHE_KEY=content``, the sha256
  of its bytes), plus the crop (offset and length in samples) for a row that is a crop of a longer file
  (``offset_s``: KS silence crops) -> :func:`utterance_key`.
Never labels, split names or the manifest: the five ER folds, ASR and PR, or SID and ASV on the same audio share
their entries, and only what is missing goes through the upstream (in length buckets).

**Entries** come in two kinds:
- ``pooled``: the masked time-mean of every layer, ``[L, D]`` float32. Exact for the utterance-level SUPERB heads
  (linear -> mean -> linear), see ``downstreams.heads.UtteranceLevelHead``;
- ``frames``: every valid frame, ``[T, L, D]`` float16, for frame-level heads (PR, ASR, ASV, SID with crops), plus
  the same float32 time-mean ``[L, D]``. A pooled request is served by either kind and always gets the float32 mean
  computed from the upstream's output at extraction, never a mean of float16 frames.

**Layout** (``<cache>/features/v2/<upstream key>/``)::

    upstream.json                         the upstream identity and precision (for ``bench cache ls``)
    shards/<sha256[:32]>.safetensors      write-once, named by the sha256 of their own bytes
    shards/<sha256[:32]>.json             sidecar: size, sha256, kind, the utterance key of every row; written
                                          after its shard (a shard without a sidecar is never read); its
                                          modification time is the shard's last use (``bench cache prune``)
    locks/<chunk>.lock                    held (``fcntl.flock``) while a chunk of utterances is extracted

**Index.** The sidecars are read once per process into a dict ``utterance key -> (shard, row)`` (and read again,
new ones only, after waiting for a lock). There is no shared mutable index file: every file is written once, under
a fresh name, by an atomic rename, so concurrent writers need no lock to keep the index consistent, and nothing
depends on database locking over a network file system (where caches of clusters live). The cost is one small JSON
file per shard (a few KB per 256 utterances) read at start-up; shard tensors are read only for the rows a split
uses (frames memory-mapped).

**Concurrency.** Two processes that need the same utterances (two runs, the jobs of a sweep) split the missing ones
into the same chunks and take a lock per chunk: each chunk is extracted by one process while the other takes the
next free chunk, then finds the rest already written. The ranks of a torchrun job share the work out instead: each
extracts its share of a split (dealt by duration), they wait for each other, then each looks up the whole split,
which is then complete (:meth:`FeatureStore.ensure`). Whatever happens, a shard is never
written twice under one name and never read half-written. Shards whose size or sha256 do not match their sidecar
(truncated, corrupted) are deleted and their utterances extracted again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from speechbench.benchmark.features import extraction_batch_s, upstream_hidden
from speechbench.common import SpeechbenchError, atomic_path, atomic_write_text, sha256_file
from speechbench.common import cache_root as common_cache_root
from speechbench.downstreams.data import DataError, Utterance, bucket_by_duration, resolve_audio_path, row_reference
from speechbench.runtime import PRECISIONS, Progress, Runtime, all_gather_objects
from speechbench.upstreams.base import Upstream, describe_upstream

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process locks (concurrent runs may then extract the same audio twice)
    fcntl = None

log = logging.getLogger("speechbench")

CACHE_VERSION = 2
SHARD_UTTERANCES = 256
GRANULARITIES = ("pooled", "frames")
SHARD_FORMAT = "speechbench-feature-shard-v2"
AUDIO_KEY_MODES = ("path", "content")
PRECISION_WORDS = {"fp32": "float32", "bf16": "bf16-autocast", "fp16": "fp16-autocast"}


def pooled_source(precision: str) -> str:
    """What pooled features are (``result.json``'s ``feature_cache.pooled``)."""
    return f"float32 time-means of the {PRECISION_WORDS[precision]} upstream output, stored at extraction"


POOLED_SOURCE = pooled_source("fp32")


def cache_root() -> Path:
    """``<speechbench cache>/features`` (see :func:`speechbench.common.cache_root`)."""
    return common_cache_root("features")


def store_root(root: Path | None = None) -> Path:
    """The folder holding one sub-folder per upstream (``<features>/v2``)."""
    return (root or cache_root()) / f"v{CACHE_VERSION}"


# ------------------------------------------------------------------------------------------------------------ keys

def upstream_identity(upstream: Upstream, label: str, precision: str = "fp32") -> dict:
    """What determines an upstream's outputs: :func:`describe_upstream`, the precision, and ``label`` (the name of
    the run's upstream) when no checkpoint sha256 tells two weight sets apart."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    identity = {"upstream": describe_upstream(upstream), "precision": precision}
    if not identity["upstream"]["checkpoint_sha256"]:
        identity["label"] = label
    return identity


def upstream_key(identity: dict) -> str:
    text = json.dumps({"version": CACHE_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def audio_key_mode() -> str:
    """``$SPEECHBENCH_CACHE_KEY``: ``path`` (default: resolved path, size, mtime) or ``content`` (sha256 of the
    bytes: survives copies and touches, costs one read of every file per process)."""
    mode = os.environ.get("SPEECHBENCH_CACHE_KEY", "path") or "path"
    if mode not in AUDIO_KEY_MODES:
        raise SpeechbenchError(f"SPEECHBENCH_CACHE_KEY={mode!r}: expected one of {', '.join(AUDIO_KEY_MODES)}")
    return mode


_CONTENT_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256, so a process hashes a file once


def audio_identity(utt: Utterance, audio_root: Path | None, sample_rate: int, mode: str = "path") -> dict:
    """The audio an utterance's features come from: file identity plus the crop in samples (crop rows only).

    A row of a Hugging Face dataset (``<file>.arrow#<column>:<row>``, see ``downstreams/hf_data.py``) is the Arrow
    file's identity plus the column and row.
    """
    path = str(resolve_audio_path(utt, audio_root))
    row = row_reference(path)
    path = os.path.realpath(row[0] if row else path)
    try:
        st = os.stat(path)
    except OSError:
        raise DataError(f"{path}: audio file not found (utterance {utt.id})") from None
    if mode == "content":
        stat_key = (path, st.st_size, st.st_mtime_ns)
        if stat_key not in _CONTENT_HASHES:
            _CONTENT_HASHES[stat_key] = sha256_file(path)
        ident: dict = {"sha256": _CONTENT_HASHES[stat_key]}
    else:
        ident = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if row:
        ident["row"] = f"{row[1]}:{row[2]}"
    if "offset_s" in utt.labels:  # the same rounding as downstreams.data.load_utterance_audio
        ident["crop"] = [int(round(float(utt.labels["offset_s"]) * sample_rate)),
                         int(round(utt.duration_s * sample_rate))]
    return ident


def utterance_key(utt: Utterance, audio_root: Path | None, sample_rate: int, mode: str = "path") -> str:
    text = json.dumps(audio_identity(utt, audio_root, sample_rate, mode), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def estimate_frames_bytes(utts: Sequence[Utterance], upstream: Upstream) -> int:
    """float16 bytes of a frames cache: sum of frames x L x D x 2."""
    frames = sum(int(u.duration_s * upstream.sample_rate) // upstream.downsample_rate + 1 for u in utts)
    return frames * upstream.num_layers * upstream.hidden_size * 2


# ------------------------------------------------------------------------------------------------------ extraction

def extract_chunk(upstream: Upstream, utts: Sequence[Utterance], audio_root: Path | None, granularity: str,
                  max_batch_s: float, runtime: Runtime | None = None) -> dict[str, torch.Tensor]:
    """Run the upstream over one chunk of utterances, in length buckets, on the runtime's device and precision; keep
    the chunk's order in the output (on the CPU).

    ``pooled [N, L, D]`` float32 always; with ``granularity="frames"`` also ``frames [sum T, L, D]`` float16 and
    ``offsets [N + 1]``. Everything stays in inference mode (the tensors go to disk, never into autograd), and each
    utterance is reduced from a view of its valid frames: no copy of the ``[B, L, T, D]`` batch is made.
    """
    pooled: list[torch.Tensor | None] = [None] * len(utts)
    frames: list[torch.Tensor | None] = [None] * len(utts)
    with torch.inference_mode():
        for batch in bucket_by_duration([u.duration_s for u in utts], max_batch_s):
            hidden, lengths = upstream_hidden(upstream, [utts[i] for i in batch], audio_root, runtime=runtime)
            for j, (i, n) in enumerate(zip(batch, lengths.tolist(), strict=True)):
                pooled[i] = hidden[j, :, :n].float().mean(dim=1)  # [L, D]: time-mean of the valid frames
                if granularity == "frames":
                    frames[i] = hidden[j, :, :n].permute(1, 0, 2).to(torch.float16).cpu()  # [T, L, D]
        out = {"pooled": torch.stack(pooled).cpu()}
        if granularity == "frames":
            lengths = torch.tensor([f.shape[0] for f in frames], dtype=torch.long)
            offsets = torch.zeros(len(frames) + 1, dtype=torch.long)
            offsets[1:] = torch.cumsum(lengths, 0)
            out.update(frames=torch.cat(frames), offsets=offsets)
        return out


@contextlib.contextmanager
def chunk_lock(path: Path, blocking: bool) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` for the body; yields False (not locked) when ``blocking`` is False
    and another process holds it."""
    if fcntl is None:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            with contextlib.suppress(OSError):
                os.utime(path)  # activity, for `bench cache prune`
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------------- store

@dataclass(frozen=True)
class Entry:
    """Where one utterance's features are: a shard (by name), its row, and the shard's kind."""

    shard: str
    row: int
    kind: str
    created: float


@dataclass
class SplitStats:
    """What :meth:`FeatureStore.ensure` did for one split (recorded in ``result.json``)."""

    utterances: int
    extracted: int = 0  # utterances this call ran through the upstream
    reused: int = 0  # utterances found in the cache
    from_frames_entries: int = 0  # of the utterances, those served by a frames entry (pooled requests only)

    def record(self, granularity: str) -> dict:
        out = {"utterances": self.utterances, "extracted": self.extracted, "reused": self.reused}
        if granularity == "pooled":
            out["pooled_from"] = {"pooled": self.utterances - self.from_frames_entries,
                                  "frames": self.from_frames_entries}
        return out


@dataclass
class FeatureStore:
    """The cache directory of one (upstream, precision): lookup by utterance key, extraction of what is missing."""

    directory: Path
    identity: dict
    label: str = ""  # the run's name for the upstream, recorded in the sidecars it writes (bench cache ls)
    _entries: dict[str, list[Entry]] = field(default_factory=dict)
    _read: set[str] = field(default_factory=set)  # sidecars already read
    _verified: set[str] = field(default_factory=set)
    _touched: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, upstream: Upstream, label: str, precision: str = "fp32", root: Path | None = None) -> FeatureStore:
        identity = upstream_identity(upstream, label, precision)
        directory = store_root(root) / upstream_key(identity)
        (directory / "shards").mkdir(parents=True, exist_ok=True)
        if not (directory / "upstream.json").is_file():
            atomic_write_text(directory / "upstream.json", json.dumps(
                {"version": CACHE_VERSION, "key": directory.name, **identity}, indent=1, default=str))
        return cls(directory, identity, label)

    @property
    def shards(self) -> Path:
        return self.directory / "shards"

    def refresh(self) -> None:
        """Read the sidecars written since the last call (by this or another process)."""
        for sidecar in sorted(self.shards.glob("*.json")):
            if sidecar.stem in self._read:
                continue
            try:
                meta = json.loads(sidecar.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # removed meanwhile (prune), or not ours: never read a shard without a valid sidecar
            self._read.add(sidecar.stem)
            try:
                if meta["format"] != SHARD_FORMAT or meta["kind"] not in GRANULARITIES:
                    continue
                entries = [(key, Entry(sidecar.stem, row, meta["kind"], float(meta["created"])))
                           for row, key in enumerate(meta["keys"])]
            except (KeyError, TypeError, ValueError):
                continue  # not a sidecar of this version: its shard is never read
            for key, entry in entries:
                self._entries.setdefault(key, []).append(entry)

    def _candidate(self, key: str, granularity: str) -> Entry | None:
        """The oldest entry that serves ``granularity`` (frames entries also serve pooled requests)."""
        found = [e for e in self._entries.get(key, ()) if granularity == "pooled" or e.kind == "frames"]
        return min(found, key=lambda e: (e.created, e.shard)) if found else None

    def _verify(self, shard: str) -> bool:
        """Size and sha256 of a shard against its sidecar, once per process; a damaged shard is deleted."""
        if shard in self._verified:
            return True
        path, sidecar = self.shards / f"{shard}.safetensors", self.shards / f"{shard}.json"
        try:
            meta = json.loads(sidecar.read_text())
            ok = path.stat().st_size == meta["size"] and sha256_file(path) == meta["sha256"]
        except (OSError, json.JSONDecodeError, KeyError):
            ok = False
        if ok:
            self._verified.add(shard)
            return True
        log.warning("feature cache: shard %s is damaged or gone; extracting its utterances again", path)
        for p in (sidecar, path):
            with contextlib.suppress(OSError):
                p.unlink()
        for key in list(self._entries):
            self._entries[key] = [e for e in self._entries[key] if e.shard != shard]
        self._read.discard(shard)  # its re-extraction may give the same bytes, hence the same name: read it again
        return False

    def lookup(self, keys: Sequence[str], granularity: str) -> list[Entry | None]:
        """The entry of every key (None where missing); the shards they come from are verified."""
        while True:
            entries = [self._candidate(k, granularity) for k in keys]
            if all(self._verify(s) for s in sorted({e.shard for e in entries if e is not None})):
                return entries

    def _write_shard(self, tensors: dict[str, torch.Tensor], keys: Sequence[str], granularity: str) -> str:
        """Write a shard under the sha256 of its bytes, then its sidecar: both write-once, both atomic.

        The keys go into the shard's metadata too, so equal features under other keys (a copy of the audio at
        another path) make another shard, and equal names mean equal sidecars.
        """
        staged = self.shards / f".staging-{uuid.uuid4().hex}.safetensors"
        with atomic_path(staged) as tmp:
            # one metadata entry: the order of several is not fixed, and the name must follow the content
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"keys": json.dumps(list(keys))})
            digest, size = sha256_file(tmp), os.path.getsize(tmp)
        name = digest[:32]
        target = self.shards / f"{name}.safetensors"
        if target.is_file() and target.stat().st_size == size:
            staged.unlink()  # the same bytes are there already (another process extracted the same chunk)
        else:
            os.replace(staged, target)
        if not (self.shards / f"{name}.json").is_file():
            atomic_write_text(self.shards / f"{name}.json", json.dumps(
                {"format": SHARD_FORMAT, "kind": granularity, "size": size, "sha256": digest,
                 "created": time.time(), "label": self.label, "keys": list(keys)}))
        self._verified.add(name)
        return name

    def _extract_missing(self, upstream: Upstream, todo: list[tuple[str, Utterance]], audio_root: Path | None,
                         granularity: str, max_batch_s: float, desc: str, runtime: Runtime) -> set[str]:
        """Extract the missing utterances chunk by chunk, one process per chunk (see the module docstring); return
        the keys this process extracted."""
        chunks = [todo[i: i + SHARD_UTTERANCES] for i in range(0, len(todo), SHARD_UTTERANCES)]
        names = [hashlib.sha256("".join(k for k, _ in c).encode()).hexdigest()[:24] for c in chunks]
        locks = [self.directory / "locks" / f"{granularity}-{name}.lock" for name in names]
        pending, extracted = list(range(len(chunks))), set()
        bar = Progress(len(todo), f"feature cache {desc}".rstrip(), "utt")
        while pending:
            progressed = False
            for c in list(pending):
                with chunk_lock(locks[c], blocking=False) as locked:
                    if not locked:
                        continue
                    self.refresh()
                    missing = [(k, u) for k, u in chunks[c] if self._candidate(k, granularity) is None]
                    if missing:
                        tensors = extract_chunk(upstream, [u for _, u in missing], audio_root, granularity,
                                                max_batch_s, runtime)
                        self._write_shard(tensors, [k for k, _ in missing], granularity)
                        self.refresh()
                        extracted.update(k for k, _ in missing)
                    pending.remove(c)
                    progressed = True
                    bar.update(len(chunks[c]))
            if pending and not progressed:  # every remaining chunk is being extracted elsewhere: wait for one
                with chunk_lock(locks[pending[0]], blocking=True):
                    pass
        bar.close()
        return extracted

    def ensure(self, upstream: Upstream, utts: Sequence[Utterance], audio_root: Path | None, granularity: str,
               max_batch_s: float | None = None, desc: str = "", runtime: Runtime | None = None) -> SplitFeatures:
        """The features of ``utts`` (in their order), extracting only those not in the cache yet, on the runtime's
        device and precision (the store's precision: :meth:`open`).

        Under torchrun every rank of the job calls it with the same utterances: each first extracts its share (the
        utterances sorted by duration, dealt round-robin), all wait for each other, then each looks up the whole
        split, which no rank reads before every share is written."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        runtime = runtime or Runtime()
        max_batch_s = extraction_batch_s(runtime.device) if max_batch_s is None else max_batch_s
        mode = audio_key_mode()
        keys = [utterance_key(u, audio_root, upstream.sample_rate, mode) for u in utts]
        self.refresh()
        extracted: set[str] = set()
        if runtime.dist.enabled:
            order = sorted(range(len(utts)), key=lambda i: utts[i].duration_s)[runtime.dist.rank::
                                                                                runtime.dist.world_size]
            _, mine = self._ensure_keys(upstream, [keys[i] for i in order], [utts[i] for i in order], audio_root,
                                        granularity, max_batch_s, desc, runtime)
            extracted = set().union(*all_gather_objects(sorted(mine)))  # also waits for every rank's share
        entries, rest = self._ensure_keys(upstream, keys, utts, audio_root, granularity, max_batch_s, desc, runtime)
        extracted |= rest
        stats = SplitStats(len(utts), len(extracted), sum(1 for k in keys if k not in extracted),
                           sum(1 for e in entries if e.kind == "frames") if granularity == "pooled" else 0)
        for shard in {e.shard for e in entries} - self._touched:  # last use, for `bench cache prune --older-than`
            with contextlib.suppress(OSError):
                os.utime(self.shards / f"{shard}.json")
            self._touched.add(shard)
        log.info("feature cache (%s, %s): %d utterances, %d extracted, %d reused [%s]", granularity, desc,
                 len(utts), stats.extracted, stats.reused, self.directory.name[:12],
                 extra={"feature_cache_stats": stats})  # structured, for counters (bench sweep): not the text
        return SplitFeatures(self, entries, stats)

    def _ensure_keys(self, upstream: Upstream, keys: Sequence[str], utts: Sequence[Utterance],
                     audio_root: Path | None, granularity: str, max_batch_s: float, desc: str, runtime: Runtime,
                     ) -> tuple[list[Entry], set[str]]:
        """The entries of ``keys`` once every missing one is extracted, and the keys this call extracted."""
        extracted: set[str] = set()
        for attempt in range(4):  # a shard found damaged on lookup sends its utterances back to extraction
            entries = self.lookup(keys, granularity)
            todo = list({k: u for k, u, e in zip(keys, utts, entries, strict=True) if e is None}.items())
            if not todo:
                return entries, extracted
            if attempt == 3:
                raise SpeechbenchError(f"feature cache {self.directory}: shards keep failing their checksum; "
                                       "is the disk full or failing?")
            extracted |= self._extract_missing(upstream, todo, audio_root, granularity, max_batch_s, desc, runtime)
        raise AssertionError("unreachable")


@dataclass
class SplitFeatures:
    """The cached features of one split, in its order: ``pooled()`` or ``frames(frame_rate)``."""

    store: FeatureStore
    entries: list[Entry]
    stats: SplitStats

    def _shard_path(self, shard: str) -> Path:
        return self.store.shards / f"{shard}.safetensors"

    def pooled(self) -> torch.Tensor:
        """Per-layer float32 time-means ``[N, L, D]``."""
        by_shard: dict[str, torch.Tensor] = {}
        for shard in dict.fromkeys(e.shard for e in self.entries):
            with safe_open(str(self._shard_path(shard)), framework="pt") as f:
                by_shard[shard] = f.get_tensor("pooled")
        return torch.stack([by_shard[e.shard][e.row] for e in self.entries])

    def frames(self, frame_rate: float, device: torch.device | None = None) -> CachedFrames:
        shards = list(dict.fromkeys(e.shard for e in self.entries))
        index = {s: i for i, s in enumerate(shards)}
        return CachedFrames([self._shard_path(s) for s in shards], [(index[e.shard], e.row) for e in self.entries],
                            frame_rate, device=device)


class CachedFrames:
    """Frame-level features read from memory-mapped shards: ``get(indices) -> ([B, L, T, D] float32, lengths [B])``
    on ``device`` (padded as float16 on the CPU, moved, then widened: half the bytes cross to a GPU).

    ``rows[i] = (shard index, row in that shard)`` of utterance ``i``. With ``crop_frames``, utterances longer than
    that are cut to a random window (seeded by ``(seed, draw)``).
    """

    def __init__(self, shards: Sequence[Path], rows: Sequence[tuple[int, int]], frame_rate: float,
                 crop_frames: int | None = None, seed: int = 0, device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self.frame_rate = frame_rate  # frames per second, to report durations for length bucketing
        self._files = [safe_open(str(s), framework="pt") for s in shards]
        offsets = [f.get_tensor("offsets") for f in self._files]
        self._frames = [f.get_slice("frames") for f in self._files]
        self._spans = [(s, int(offsets[s][r]), int(offsets[s][r + 1])) for s, r in rows]
        self._lengths = torch.tensor([end - start for _, start, end in self._spans], dtype=torch.long)
        self.crop_frames, self.seed = crop_frames, seed

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
        shard, start, end = self._spans[index]
        return self._frames[shard][start:end]  # [T, L, D] float16

    def get(self, indices: Sequence[int], draw: int = 0, part: slice | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames of ``indices[part]`` (all of them without ``part``), cropped as the whole of ``indices``."""
        part = part or slice(None)
        if self.crop_frames:  # crop offsets drawn over the whole micro-batch, in its order (a torchrun rank's part)
            rng = np.random.default_rng([self.seed, draw])
            spans = []
            for i in indices:
                shard, start, end = self._spans[i]
                if end - start > self.crop_frames:
                    start += int(rng.integers(0, end - start - self.crop_frames + 1))
                    end = start + self.crop_frames
                spans.append((shard, start, end))
            items = [self._frames[shard][start:end] for shard, start, end in spans[part]]
        else:
            items = [self._utterance(i) for i in list(indices)[part]]
        lengths = torch.tensor([x.shape[0] for x in items], dtype=torch.long)
        _, num_layers, d = items[0].shape
        out = torch.zeros(len(items), int(lengths.max()), num_layers, d, dtype=torch.float16)
        for j, x in enumerate(items):
            out[j, : x.shape[0]] = x
        out = out.to(self.device, non_blocking=True).float()
        return out.permute(0, 2, 1, 3), lengths.to(self.device)  # [B, L, T, D]
