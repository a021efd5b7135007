"""``bench extract``: dump an upstream's layer-wise features, one safetensors file per utterance.

Output layout::

    OUT/upstream.json                       declared attributes, checkpoint sha256/format, dtype, precision (first)
    OUT/<file-safe utterance id>.safetensors
        hidden_states  [L, T, D]  float32 (or float16 with --dtype float16), valid frames only
        num_frames     [1]        int64, T
        (metadata: utterance_id, upstream)
    OUT/index.jsonl                         {"id", "file", "num_frames", "duration_s"} per utterance (written last)

Input: a directory searched recursively for ``*.wav``/``*.flac`` (utterance id = relative path without the
extension, e.g. ``spk1/utt3``) or a JSONL manifest (``downstreams.data.read_manifest``; relative audio paths resolve
against ``--audio-root``, else the row's own ``audio_root`` (the manifests of a run folder have one), else the nearest
of the manifest's folder and its parents where the first file exists).

Batches are length-bucketed and capped by total padded audio seconds; the default cap is the device's batch policy
(:data:`speechbench.benchmark.features.BATCH_POLICY_S`, chosen by measurement). The upstream runs on the runtime's
device and precision (``--device``, ``--precision``); under torchrun each rank extracts its share of the files (dealt by
duration) and rank 0 writes the index once all are written. Every file is written to a temporary name and
renamed, so an existing file is complete: an interrupted run resumes by skipping them. Ids are made file-safe by
percent-encoding every character outside ``[A-Za-z0-9-_.,+=@]`` (so ``/`` becomes ``%2F`` and distinct ids stay
distinct); very long ids are truncated and suffixed with a hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import string
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file

from speechbench.benchmark.features import extraction_batch_s, upstream_forward
from speechbench.common import atomic_path, atomic_write_text
from speechbench.downstreams.data import (
    DataError,
    Utterance,
    bucket_by_duration,
    load_utterance_audio,
    read_manifest,
    resolve_audio_path,
)
from speechbench.runtime import Progress, Runtime, all_gather_objects
from speechbench.upstreams.base import Upstream, describe_upstream

log = logging.getLogger("speechbench")

AUDIO_SUFFIXES = (".wav", ".flac")
DTYPES = {"float32": torch.float32, "float16": torch.float16}
_SAFE_CHARS = frozenset(string.ascii_letters + string.digits + "-_.,+=@")
MAX_NAME = 180
FORMAT = "speechbench-features-v1"
def safe_file_name(utterance_id: str) -> str:
    """A file-system-safe, injective name for an utterance id (percent-encoding; long ids hashed)."""
    name = "".join(c if c in _SAFE_CHARS else "".join(f"%{b:02X}" for b in c.encode("utf-8"))
                   for c in utterance_id)
    if name.startswith(".") or not name:
        name = "%2E" + name[1:] if name else "%00"
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 18]}~{hashlib.sha1(utterance_id.encode()).hexdigest()[:16]}"
    return name


def scan_audio_dir(directory: Path) -> list[Utterance]:
    """Every ``*.wav``/``*.flac`` under ``directory`` as utterances with ids = relative paths without extension."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise DataError(f"{directory}: no .wav or .flac files found (searched recursively)")
    utts = []
    for p in files:
        rel = p.relative_to(directory)
        try:
            info = sf.info(str(p))
        except Exception as e:
            raise DataError(f"{p}: cannot read audio header ({type(e).__name__})") from None
        utts.append(Utterance(rel.with_suffix("").as_posix(), rel.as_posix(), info.frames / info.samplerate, "", ""))
    return utts


def _manifest_root(manifest: Path, utts: Sequence[Utterance]) -> Path:
    relative = next((u for u in utts if not Path(u.path).is_absolute()), None)
    candidates = [manifest.parent, *list(manifest.parent.parents)[:3]]
    if relative is None:
        return manifest.parent
    for root in candidates:
        if resolve_audio_path(relative, root).exists():
            if root != manifest.parent:
                log.info("audio paths of %s resolve against %s", manifest, root)
            return root
    raise DataError(f"{manifest}: audio {relative.path!r} not found under {', '.join(map(str, candidates))}; "
                    f"pass --audio-root")


def load_inputs(data: str | os.PathLike, audio_root: str | os.PathLike | None = None,
                ) -> tuple[list[Utterance], Path | None]:
    """Utterances and their audio root from a directory of audio files or a JSONL manifest."""
    data = Path(data)
    if data.is_dir():
        return scan_audio_dir(data), data
    if not data.is_file():
        raise DataError(f"{data}: not found (expected a directory of audio files or a JSONL manifest)")
    utts = read_manifest(data, row_roots=not audio_root)
    if not utts:
        raise DataError(f"{data}: manifest has no utterances")
    root = Path(audio_root) if audio_root else _manifest_root(data, utts)
    return utts, root


def upstream_description(upstream: Upstream, dtype: str, precision: str = "fp32") -> dict:
    return {"format": FORMAT, **describe_upstream(upstream), "dtype": dtype, "precision": precision}


def _claim_output(out_dir: Path, description: dict) -> None:
    path = out_dir / "upstream.json"
    if path.is_file():
        previous = {"precision": "fp32", **json.loads(path.read_text())}  # written before precisions existed
        if previous != json.loads(json.dumps(description)):
            changed = sorted(k for k in set(previous) | set(description) if previous.get(k) != description.get(k))
            raise DataError(f"{out_dir}: holds features of another upstream or setting (differs in "
                            f"{', '.join(changed)}); choose another --out")
        return
    atomic_write_text(path, json.dumps(description, indent=2, sort_keys=True) + "\n")


def _save(path: Path, hidden: torch.Tensor, num_frames: int, metadata: dict) -> None:
    with atomic_path(path) as tmp:
        save_file({"hidden_states": hidden, "num_frames": torch.tensor([num_frames], dtype=torch.long)}, tmp,
                  metadata=metadata)


@dataclass
class ExtractSummary:
    written: int
    skipped: int
    audio_seconds: float
    wall_seconds: float

    @property
    def speed(self) -> float:
        """Audio seconds processed per wall second (written utterances only)."""
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else float("inf")


def extract_features(upstream: Upstream, utts: Sequence[Utterance], audio_root: Path | None, out_dir: str | os.PathLike,
                     dtype: str = "float32", max_batch_s: float | None = None, progress: bool = True,
                     runtime: Runtime | None = None) -> ExtractSummary:
    """Run the frozen upstream over ``utts`` and write ``OUT/<id>.safetensors`` (``[L, T, D]``) per utterance.

    Already complete files are skipped. Audio loading and file writing overlap the forward passes (threads).
    ``max_batch_s``: padded audio seconds per batch (default: the device's :func:`extraction_batch_s`).
    ``runtime``: device, precision, torchrun place (default: one CPU process, fp32). Under torchrun each rank
    writes its share and the summary counts every rank's work.
    """
    if dtype not in DTYPES:
        raise DataError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    runtime = runtime or Runtime()
    max_batch_s = extraction_batch_s(runtime.device) if max_batch_s is None else max_batch_s
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [safe_file_name(u.id) for u in utts]
    if len(set(names)) != len(names):
        dup = next(u.id for u, n in zip(utts, names, strict=True) if names.count(n) > 1)
        raise DataError(f"duplicate utterance id {dup!r}: ids must be unique")
    _claim_output(out_dir, upstream_description(upstream, dtype, runtime.precision))
    pending = [i for i, n in enumerate(names) if not (out_dir / f"{n}.safetensors").is_file()]
    if runtime.dist.enabled:  # rank 0's list, taken before any rank writes
        pending = all_gather_objects(pending)[0]
    skipped = len(utts) - len(pending)
    if skipped:
        log.info("%s: %d of %d utterances already extracted; resuming", out_dir, skipped, len(utts))
    if runtime.dist.enabled:  # this rank's share, dealt in duration order so every rank gets as much audio
        pending = sorted(pending, key=lambda i: utts[i].duration_s)[runtime.dist.rank::runtime.dist.world_size]
    batches = [[pending[j] for j in b] for b in bucket_by_duration([utts[i].duration_s for i in pending], max_batch_s)]
    sr, torch_dtype = upstream.sample_rate, DTYPES[dtype]

    def load(batch: list[int]) -> tuple[list[int], list[np.ndarray]]:
        return batch, [load_utterance_audio(utts[i], audio_root, sr) for i in batch]

    t0, audio_s = time.perf_counter(), 0.0
    with ThreadPoolExecutor(max_workers=1) as loader, ThreadPoolExecutor(max_workers=1) as writer, \
            Progress(len(pending), "extract", "utt", enabled=progress) as bar:
        writes = []
        next_load = loader.submit(load, batches[0]) if batches else None
        for k in range(len(batches)):
            batch, waves = next_load.result()
            next_load = loader.submit(load, batches[k + 1]) if k + 1 < len(batches) else None
            with torch.inference_mode():
                hidden, lengths = upstream_forward(upstream, waves, runtime)
                for j, n in enumerate(lengths.tolist()):
                    # valid frames as one contiguous CPU tensor of the stored dtype: a view when it already is one
                    # (one utterance per batch, fp32 on the CPU), else one copy
                    tensor = hidden[j, :, :n].to("cpu", torch_dtype).contiguous()
                    meta = {"utterance_id": utts[batch[j]].id, "upstream": upstream.name}
                    writes.append(writer.submit(_save, out_dir / f"{names[batch[j]]}.safetensors", tensor, n, meta))
            audio_s += sum(w.shape[0] for w in waves) / sr
            for w in [w for w in writes if w.done()]:
                w.result()
                writes.remove(w)
            bar.update(len(batch))
        for w in writes:
            w.result()
    wall = time.perf_counter() - t0
    if runtime.dist.enabled:  # every rank's files are written (the gather waits for all), then one index
        shares = all_gather_objects((len(pending), audio_s, wall))
        pending_n, audio_s = sum(n for n, _, _ in shares), sum(a for _, a, _ in shares)
        wall = max(w for *_, w in shares)
    else:
        pending_n = len(pending)
    if runtime.dist.main:
        _write_index(out_dir, utts, names)
    return ExtractSummary(pending_n, skipped, audio_s, wall)


def _write_index(out_dir: Path, utts: Sequence[Utterance], names: Sequence[str]) -> None:
    from safetensors import safe_open

    rows = []
    for u, n in zip(utts, names, strict=True):
        with safe_open(str(out_dir / f"{n}.safetensors"), framework="pt") as f:
            frames = int(f.get_slice("hidden_states").get_shape()[1])
        rows.append(json.dumps({"id": u.id, "file": f"{n}.safetensors", "num_frames": frames,
                                "duration_s": round(u.duration_s, 4)}, ensure_ascii=False))
    atomic_write_text(out_dir / "index.jsonl", "\n".join(rows) + "\n")


def load_features(path: str | os.PathLike) -> tuple[torch.Tensor, int, dict]:
    """Read one extracted file: ``(hidden_states [L, T, D], num_frames, metadata)``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("hidden_states"), int(f.get_tensor("num_frames")[0]), dict(f.metadata() or {})
