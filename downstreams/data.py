"""Manifests, audio loading and batching shared by every task.

A manifest is a JSONL file, one utterance per line, in the spirit of lhotse's recordings manifests::

    {"id": "ks-000123", "path": "wavs/ks/ks-000123.wav", "duration_s": 1.0, "speaker": "spk017",
     "split": "train", "keyword": "yes"}

``path`` is relative to the manifest's audio root (or absolute). Besides the five fixed fields a row carries the
task's label fields (``keyword``; ``action``/``object``/``location``; ``emotion`` and ``fold``; ``text``;
``phonemes`` as space-separated symbols). Those extra fields travel in ``Utterance.labels``.

A row may also carry its audio root as an absolute path, which makes it self-describing (the manifests a run
writes into its folder do; they can be used as they are, concatenated or filtered)::

    {"id": "Ses01F_impro01_F000", "path": "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav",
     "audio_root": "/data/IEMOCAP_full_release", "duration_s": 1.94, ...}

:func:`read_manifest` joins such a row's relative ``path`` to its ``audio_root``; rows without one are unchanged.

A ``path`` may also be a row of a Hugging Face dataset (``--data-root hf:...``, see :mod:`downstreams.hf_data`): a
*row reference* ``<arrow file>#<audio column>:<row>``, e.g. ``train/data-00000-of-00001.arrow#audio:12`` relative to
the dataset's folder. It is joined to its root like any path; :func:`load_audio` reads the row's stored audio and
decodes it as it would a file. :func:`row_reference` splits such a path; a feature cache that identifies audio by its
file (path, size, mtime or content) uses the Arrow file and adds the row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from speechbench.common import SAMPLE_RATE, SpeechbenchError, atomic_write_text

_FIXED_FIELDS = ("id", "path", "duration_s", "speaker", "split")


class DataError(SpeechbenchError, ValueError):
    """A dataset or audio file that does not match what a task expects (one-line message)."""


def expect_path(path: str | os.PathLike, what: str, layout: str) -> Path:
    """Return ``path`` if it exists, else raise a one-line :class:`DataError` naming what the layout expects there
    and what its parent folder holds instead (the first 12 names)."""
    path = Path(path)
    if not path.exists():
        parent = path.parent
        found = sorted(p.name for p in parent.iterdir())[:12] if parent.is_dir() else []
        hint = f"; found in {parent}: {', '.join(found) or 'nothing'}" if parent.is_dir() else ""
        raise DataError(f"{path}: expected {what} of the {layout} layout, not found{hint}")
    return path


def audio_duration_s(path: str | os.PathLike, listed_in: str | os.PathLike | None = None) -> float:
    """Duration of an audio file from its header; a one-line :class:`DataError` if it is missing or unreadable
    (``listed_in``: the list or label file that named it, for the message)."""
    path = Path(path)
    where = f" (listed in {listed_in})" if listed_in else ""
    if not path.is_file():
        raise DataError(f"{path}: audio file not found{where}")
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises several types; one clear message for all
        raise DataError(f"{path}: cannot read audio{where} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return info.frames / info.samplerate


@dataclass(frozen=True)
class Utterance:
    id: str
    path: str
    duration_s: float
    speaker: str
    split: str
    labels: dict = field(default_factory=dict)

    def to_row(self) -> dict:
        row = {"id": self.id, "path": self.path, "duration_s": round(float(self.duration_s), 4),
               "speaker": self.speaker, "split": self.split}
        row.update(self.labels)
        return row

    @classmethod
    def from_row(cls, row: dict, source: str = "<manifest>") -> Utterance:
        missing = [k for k in _FIXED_FIELDS if k not in row]
        if missing:
            raise DataError(f"{source}: manifest row {row.get('id', '?')!r} lacks field(s) {missing}")
        labels = {k: v for k, v in row.items() if k not in _FIXED_FIELDS}
        return cls(str(row["id"]), str(row["path"]), float(row["duration_s"]), str(row["speaker"]),
                   str(row["split"]), labels)








def write_manifest(path: str | os.PathLike, utterances: Iterable[Utterance],
                   audio_root: str | os.PathLike | None = None) -> None:
    """Write a JSONL manifest; with ``audio_root``, every row records it (as an absolute path) after its ``path``."""
    root = str(Path(audio_root).absolute()) if audio_root is not None else None
    lines = []
    for u in utterances:
        row = u.to_row()
        if root is not None:
            row = {k: v for k, v in row.items() if k in ("id", "path")} | {"audio_root": root} | row
        lines.append(json.dumps(row, ensure_ascii=False, sort_keys=False))
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def read_manifest(path: str | os.PathLike, row_roots: bool = True) -> list[Utterance]:
    """The utterances of a JSONL manifest; a row's ``audio_root`` (if any) is joined to its relative ``path``
    (``row_roots=False``: dropped, the paths stay relative for a root the caller gives, e.g. a corpus that moved)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    utterances = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if isinstance(row, dict) and "audio_root" in row:
                row = dict(row)
                root = row.pop("audio_root")
                if not isinstance(root, str) or not Path(root).is_absolute():
                    raise DataError(f"{path}:{line_no}: audio_root must be an absolute path, got {root!r}")
                if row_roots and "path" in row and not Path(str(row["path"])).is_absolute():
                    row["path"] = str(Path(root) / str(row["path"]))
            utterances.append(Utterance.from_row(row, f"{path}:{line_no}"))
    return utterances


def resolve_audio_path(utt: Utterance, root: str | os.PathLike | None) -> Path:
    p = Path(utt.path)
    return p if p.is_absolute() or root is None else Path(root) / p


def row_reference(path: str | os.PathLike) -> tuple[Path, str, int] | None:
    """``(arrow file, audio column, row)`` of a dataset row reference ``<file>.arrow#<column>:<row>``, else None."""
    from speechbench.downstreams.hf_data import parse_row_reference

    return parse_row_reference(path) if ".arrow#" in str(path) else None


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, name: str | None = None) -> np.ndarray:
    """Read a mono audio file (or a dataset row reference, see the module docstring) as float32 ``[S]``; refuse
    anything that would give silently wrong numbers.

    Audio at another sample rate is resampled with a polyphase filter (scipy); multi-channel audio, empty audio and
    non-finite samples are refused with a one-line error naming the file (``name``, if given).
    """
    path = Path(path)
    name = name or str(path)
    reference = row_reference(path)
    try:
        if reference is not None:
            from speechbench.downstreams.hf_data import read_row_audio

            audio, sr = read_row_audio(*reference)
        else:
            audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except DataError as e:
        raise DataError(f"{name}: {e}") from None
    except Exception as e:  # soundfile raises several types; one clear message for all
        raise DataError(f"{name}: cannot read audio ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if audio.shape[1] != 1:
        raise DataError(f"{name}: expected mono audio, found {audio.shape[1]} channels")
    audio = audio[:, 0]
    if audio.size == 0:
        raise DataError(f"{name}: audio file is empty")
    if not np.isfinite(audio).all():
        raise DataError(f"{name}: audio contains NaN or infinite samples")
    if sr != sample_rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(sr, sample_rate)
        audio = resample_poly(audio, sample_rate // g, sr // g).astype(np.float32)
    return audio


def crop_or_pad(audio: np.ndarray, num_samples: int, offset: int = 0) -> np.ndarray:
    """Take ``num_samples`` starting at ``offset``; zero-pad at the end if the audio is shorter."""
    out = audio[offset: offset + num_samples]
    if out.shape[0] < num_samples:
        out = np.pad(out, (0, num_samples - out.shape[0]))
    return out


def collate_audio(waves: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad waveforms into ``wavs [B, S_max]`` float32 with ``wav_lengths [B]`` int64."""
    lengths = torch.tensor([w.shape[0] for w in waves], dtype=torch.long)
    wavs = torch.zeros(len(waves), int(lengths.max()), dtype=torch.float32)
    for i, w in enumerate(waves):
        wavs[i, : w.shape[0]] = torch.from_numpy(np.ascontiguousarray(w))
    return wavs, lengths


def bucket_by_duration(durations_s: Sequence[float], max_batch_s: float, max_batch_size: int | None = None,
                       ) -> list[list[int]]:
    """Group indices into batches of similar length whose padded size stays under ``max_batch_s`` seconds.

    Indices are sorted by duration, then cut greedily so that ``len(batch) * longest <= max_batch_s``
    (a single utterance longer than the cap forms its own batch). Returns batches in sorted order; callers
    shuffle the batch order if they train on it.
    """
    order = sorted(range(len(durations_s)), key=lambda i: durations_s[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = durations_s[i]  # sorted ascending, so the newcomer is the longest
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or (len(current) + 1) * longest > max_batch_s):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def iter_chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start: start + size]


def load_utterance_audio(utt: Utterance, root: str | os.PathLike | None,
                         sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Load an utterance's samples; rows with ``offset_s`` are a ``duration_s`` crop of a longer file, rows with
    ``gain_db`` are scaled by ``10 ** (gain_db / 20)`` (s3prl's sox ``gain -3`` on KS and ASV audio)."""
    path = resolve_audio_path(utt, root)
    audio = load_audio(path, sample_rate, f"{path} (utterance {utt.id})" if row_reference(path) else None)
    if "offset_s" in utt.labels:
        start = int(round(float(utt.labels["offset_s"]) * sample_rate))
        audio = crop_or_pad(audio, int(round(utt.duration_s * sample_rate)), start)
    if utt.labels.get("gain_db"):
        audio = (audio * 10.0 ** (float(utt.labels["gain_db"]) / 20.0)).astype(np.float32)
    return audio


def with_gain(utterances: Sequence[Utterance], gain_db: float) -> list[Utterance]:
    """The utterances with a ``gain_db`` label (applied when their audio is loaded); 0 leaves them unchanged."""
    if not gain_db:
        return list(utterances)
    return [Utterance(u.id, u.path, u.duration_s, u.speaker, u.split, {**u.labels, "gain_db": gain_db})
            for u in utterances]
