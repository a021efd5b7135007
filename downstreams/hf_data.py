"""Hugging Face ``datasets`` as a data source (``--data-root hf:<where>``) and the row reader behind it.

``<where>`` is one of:

- a ``save_to_disk`` folder (``dataset_dict.json``, or ``state.json`` for a single split), read with
  ``datasets.load_from_disk``;
- a folder of Parquet or Arrow files: one sub-folder per split (``train/``, ``validation/``, ``session1/`` ..., as the
  hub's Parquet export ``refs/convert/parquet`` lays out a config), or files named ``<split>.parquet`` /
  ``<split>-00000-of-00002.parquet`` (also under ``data/``), read with ``datasets.load_dataset("parquet" | "arrow",
  data_files=...)`` into the user's ``datasets`` cache;
- a hub id with an optional config and revision, ``superb:ks``, ``google/speech_commands:v0.01``,
  ``openslr/librispeech_asr:clean@refs/convert/parquet``, read with ``datasets.load_dataset`` (the user's cache and
  ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` apply). ``datasets`` 4 and later no longer run loading scripts: a
  script dataset (the original ``superb``) loads only through its Parquet export, which the error message says.

Audio is never decoded by ``datasets`` (that would need torchcodec and FFmpeg): the rows are read from the dataset's
Arrow files with pyarrow, as the stored bytes (an ``Audio`` column, ``{"bytes", "path"}``, i.e. ``Audio(decode=False)``;
or a plain binary column), a path to an audio file, or a decoded ``{"array", "sampling_rate"}`` struct, and decoded
with soundfile by :func:`speechbench.downstreams.data.load_audio`, with the same checks and resampling as audio files.

An utterance read from a dataset keeps a *row reference* as its ``path``: ``<arrow file>#<audio column>:<row>``,
relative to the folder holding the dataset's Arrow files (the prepared data's audio root), e.g.
``train/data-00000-of-00001.arrow#audio:12``. Nothing is copied out of the dataset; the row's identity for a feature
cache is the Arrow file (its path, size and modification time) and the row (see
:func:`speechbench.downstreams.data.row_reference`). Rows whose audio is a path to a file keep that file's path.

Reading streams: the Arrow files are memory-mapped, and the mappings are dropped and reopened after every
``REMAP_BYTES`` of audio read, so the pages a scan touched leave the process (its resident memory stays bounded
whatever the dataset's size; ``tests/benchmarks/bench_hf_data.py`` measures it).

A task declares the fields it reads (:class:`Field`: the published column names of the datasets it knows, first found
wins) and its splits (the published split names); ``task_options.columns.<field>=<column>`` and
``task_options.splits.<split>=<name>[,<name>...]`` map anything else. ClassLabel integers become their names.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from speechbench.common import HF_PREFIX, hf_location, is_local_hf_location
from speechbench.downstreams.data import DataError, Utterance

REMAP_BYTES = 256 << 20  # audio bytes read between two remappings of the Arrow files (bounds resident memory)
SYNTH_DATASET_NAME = "speechbench-synth"  # DatasetInfo.dataset_name of the synthetic corpus' export
DATA_SUFFIXES = (".parquet", ".arrow")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")  # "train-00000-of-00002" -> split "train"
SCRIPT_HINT = ("datasets 4 and later no longer run dataset loading scripts: load its Parquet export instead, e.g. "
               "'hf download <id> --repo-type dataset --revision refs/convert/parquet --include \"<config>/*\" "
               "--local-dir DIR' then --data-root hf:DIR/<config> (see docs/tasks.md)")


@dataclass(frozen=True)
class Field:
    """One field a task reads: the published column names that hold it (first found wins) and whether it must exist."""

    columns: tuple[str, ...]
    required: bool = True


# ----------------------------------------------------------------------------------------------- the row reader

_ROW_REFERENCE = re.compile(r"^(?P<file>.+\.arrow)#(?P<column>.+):(?P<row>\d+)$")


def parse_row_reference(path: str | os.PathLike) -> tuple[Path, str, int] | None:
    """``(arrow file, audio column, row)`` of a row reference ``<file>.arrow#<column>:<row>``, else None."""
    m = _ROW_REFERENCE.match(str(path))
    return (Path(m["file"]), m["column"], int(m["row"])) if m else None


def row_reference(file: str | os.PathLike, column: str, row: int) -> str:
    return f"{file}#{column}:{row}"


class _MappedFiles:
    """Memory-mapped Arrow stream files (as ``datasets`` writes them), all dropped once the process' file-backed
    resident memory has grown by ``budget`` bytes since they were opened.

    Dropping a table unmaps its file, so the pages a reader touched (the rows read, and the kernel's read-ahead
    around them) stop counting in the process' resident memory; they stay in the page cache, so reading them again
    is cheap. Without ``/proc/self/statm`` (not Linux), the audio bytes read are counted instead."""

    def __init__(self, budget: int = REMAP_BYTES):
        self.budget, self._tables = budget, {}
        self._read, self._base = 0, None

    def table(self, path: Path):
        import pyarrow as pa

        key = str(path)
        table = self._tables.get(key)
        if table is None:
            if not self._tables:  # the first file mapped since the last drop: measure growth from here
                self._read, self._base = 0, _file_resident_bytes()
            try:
                with pa.memory_map(key) as source:  # the table keeps the mapping alive until it is dropped
                    table = pa.ipc.open_stream(source).read_all()
            except (OSError, pa.ArrowInvalid) as e:
                raise DataError(f"{path}: cannot read the dataset's Arrow file ({_one_line(e)})") from None
            self._tables[key] = table
        return table

    def count(self, nbytes: int) -> None:
        """Note ``nbytes`` of audio read; drop every mapping when the budget is spent (callers hold no table or
        batch across this call, so the files are unmapped at once)."""
        self._read += nbytes
        resident = _file_resident_bytes()
        grown = resident - self._base if resident is not None and self._base is not None else self._read
        if grown > self.budget:
            self._tables.clear()


def _file_resident_bytes() -> int | None:
    """Resident file-backed (and shared) memory of this process, from ``/proc/self/statm``; None elsewhere."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[2]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


_FILES = _MappedFiles()


def read_row_audio(file: Path, column: str, row: int) -> tuple[np.ndarray, int]:
    """The audio of one dataset row as ``(float32 [S, C], sample rate)``: stored bytes decoded with soundfile, a
    path read from disk, or a decoded array; raises :class:`DataError` (the caller names the row)."""
    table = _FILES.table(file)
    if column not in table.column_names:
        raise DataError(f"{file}: no column {column!r}")
    if not 0 <= row < table.num_rows:
        raise DataError(f"{file}: row {row} out of range ({table.num_rows} rows)")
    value = table.column(column)[row].as_py()
    del table  # before counting: a remap must find no table in use
    kind, payload = _audio_payload(value)
    if kind == "array":
        array, sr = payload
        _FILES.count(array.nbytes)
        return (array[:, None] if array.ndim == 1 else array), sr
    import soundfile as sf

    if kind == "bytes":
        _FILES.count(len(payload))
        payload = io.BytesIO(payload)
    audio, sr = sf.read(payload, dtype="float32", always_2d=True)
    return audio, sr


def _audio_payload(value: Any) -> tuple[str, Any]:
    """One stored audio value -> ``("bytes", bytes)``, ``("path", str)`` or ``("array", (float32 array, rate))``."""
    if isinstance(value, (bytes, bytearray)):
        return ("bytes", bytes(value)) if value else ("empty", None)
    if isinstance(value, str):
        return ("path", value) if value else ("empty", None)
    if isinstance(value, dict):
        if "array" in value:
            sr = value.get("sampling_rate")
            if isinstance(sr, bool) or not isinstance(sr, (int, float)) or sr <= 0 or int(sr) != sr:
                raise DataError(f"has sampling rate {sr!r}; expected a positive integer")
            array = np.asarray(value["array"] if value["array"] is not None else [], dtype=np.float32)
            return "array", (array, int(sr))
        if value.get("bytes"):
            return "bytes", value["bytes"]
        if value.get("path"):
            return "path", value["path"]
        return "empty", None
    if value is None:
        return "empty", None
    raise DataError(f"holds a {type(value).__name__} value; expected an Audio column (bytes or path), binary, a path, "
                    "or {array, sampling_rate}")


# ----------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Split:
    """One split of a loaded dataset: its Arrow files (in row order), features, fingerprint and size."""

    name: str
    files: tuple[Path, ...]
    features: Any  # datasets.Features
    fingerprint: str
    num_rows: int
    dataset_name: str = ""

    @property
    def columns(self) -> list[str]:
        return list(self.features)


@dataclass(frozen=True)
class HFDataset:
    """A dataset opened from ``hf:<where>``: its splits and the folder that holds their Arrow files."""

    where: str
    splits: dict[str, Split]
    audio_root: Path

    @property
    def name(self) -> str:
        names = {s.dataset_name for s in self.splits.values() if s.dataset_name}
        if len(names) == 1:
            return names.pop()
        return Path(self.where).name if is_local_hf_location(self.where) else self.where

    @property
    def synthetic(self) -> bool:
        """Whether this is speechbench's synthetic corpus, exported by ``bench data synth --format hf``."""
        return any(s.dataset_name == SYNTH_DATASET_NAME for s in self.splits.values())

    def fail(self, message: str) -> DataError:
        return DataError(f"{HF_PREFIX}{self.where}: {message}")


def open_dataset(root: str) -> HFDataset:
    """Load ``hf:<where>`` (module docstring) -> :class:`HFDataset`; every problem is a one-line :class:`DataError`."""
    where = hf_location(root)
    if where is None:
        raise DataError(f"{root}: not a Hugging Face dataset location (expected hf:<folder or hub id>)")
    if not where:
        raise DataError(f"{root}: empty dataset location; expected hf:<folder or hub id>")
    loaded = _load_local(where) if is_local_hf_location(where) else _load_hub(where)
    splits = {}
    for name, ds in loaded.items():
        if getattr(ds, "_indices", None) is not None:  # a selected/shuffled view: give it files of its own rows
            ds = ds.flatten_indices()
        files = tuple(Path(f["filename"]) for f in ds.cache_files)
        if not files:
            raise DataError(f"{HF_PREFIX}{where}: split {name!r} is held in memory, not in Arrow files; save the "
                            "dataset with save_to_disk and point hf: at that folder")
        splits[str(name)] = Split(str(name), files, ds.features, ds._fingerprint, ds.num_rows,
                                  ds.info.dataset_name or "")
    if not splits:
        raise DataError(f"{HF_PREFIX}{where}: the dataset has no splits")
    audio_root = Path(os.path.commonpath([str(f.parent) for s in splits.values() for f in s.files]))
    return HFDataset(where, splits, audio_root)


def _datasets():
    try:
        import datasets
    except ImportError:  # a dependency, but an environment may lack it
        raise DataError("--data-root hf:... needs the 'datasets' package (pip install datasets)") from None
    return datasets


def _load_local(where: str) -> dict:
    datasets = _datasets()
    folder = Path(where).expanduser()
    if not folder.is_dir():
        raise DataError(f"{HF_PREFIX}{where}: dataset folder not found")
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as e:  # datasets raises several types for damaged folders
            raise DataError(f"{HF_PREFIX}{where}: cannot load the save_to_disk folder ({_one_line(e)})") from None
        if isinstance(loaded, datasets.Dataset):
            return {str(loaded.split) if loaded.split else "train": loaded}
        return dict(loaded)
    data_files = _split_files(folder)
    scripts = sorted(folder.glob("*.py"))
    if not data_files and scripts:  # a clone of a script dataset's repository
        raise DataError(f"{HF_PREFIX}{where}: {scripts[0].name} is a dataset loading script; {SCRIPT_HINT}")
    if not data_files:
        found = sorted(p.name for p in folder.iterdir())[:12]
        raise DataError(f"{HF_PREFIX}{where}: neither a save_to_disk folder (dataset_dict.json) nor a folder of "
                        f"Parquet/Arrow files; found: {', '.join(found) or 'nothing'}")
    kinds = {Path(f).suffix for files in data_files.values() for f in files}
    if len(kinds) > 1:
        raise DataError(f"{HF_PREFIX}{where}: mixes Parquet and Arrow files; keep one format per dataset folder")
    builder = "parquet" if kinds == {".parquet"} else "arrow"
    try:
        return dict(datasets.load_dataset(builder, data_files=data_files))
    except Exception as e:
        raise DataError(f"{HF_PREFIX}{where}: cannot load its {builder} files ({_one_line(e)})") from None


def _split_files(folder: Path) -> dict[str, list[str]]:
    """Split name -> data files: one sub-folder per split, or ``<split>[-00000-of-00002].<ext>`` files (also under
    ``data/``, the layout of ``push_to_hub``)."""
    def data_files(base: Path, recursive: bool) -> list[Path]:
        found = base.rglob("*") if recursive else base.iterdir()
        return sorted(p for p in found if p.is_file() and p.suffix in DATA_SUFFIXES)

    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and data_files(p, True))
    if subdirs == [folder / "data"] and not data_files(folder, False):
        folder, subdirs = folder / "data", []
    if subdirs:
        return {d.name: [str(f) for f in data_files(d, True)] for d in subdirs}
    splits: dict[str, list[str]] = {}
    for f in data_files(folder, False):
        splits.setdefault(_SHARD.sub("", f.stem), []).append(str(f))
    return splits


def _load_hub(where: str) -> dict:
    """``<id>[:<config>][@<revision>]`` through ``datasets.load_dataset`` (user's cache, offline settings honoured)."""
    datasets = _datasets()
    spec, _, revision = where.partition("@")
    repo, _, config = spec.partition(":")
    try:
        return dict(datasets.load_dataset(repo, config or None, revision=revision or None))
    except Exception as e:  # network, offline cache misses, unknown configs, scripts: one line each
        message = _one_line(e)
        if "scripts are no longer supported" in message:
            raise DataError(f"{HF_PREFIX}{where}: {repo} is a script dataset; {SCRIPT_HINT}") from None
        raise DataError(f"{HF_PREFIX}{where}: cannot load the hub dataset {repo!r}"
                        f"{f' config {config!r}' if config else ''} ({message})") from None


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ----------------------------------------------------------------------------------------------- mapping


def resolve_splits(ds: HFDataset, wanted: dict[str, tuple[str, ...]], overrides: dict[str, str] | None,
                   optional: Sequence[str] = ()) -> dict[str, list[str]]:
    """Task split -> the dataset split(s) it reads: ``task_options.splits.<split>`` (comma-separated names are
    concatenated), else the first published name the dataset has. A missing split is a one-line error listing the
    dataset's splits; an ``optional`` split that is not found is left out."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(wanted))
    if unknown:
        raise DataError(f"task_options.splits: unknown split(s) {unknown}; this task reads {', '.join(wanted)}")
    have = ", ".join(f"{s.name} ({s.num_rows} rows)" for s in ds.splits.values())
    out = {}
    for split, names in wanted.items():
        if split in overrides:
            chosen = [n.strip() for n in overrides[split].split(",") if n.strip()]
            missing = [n for n in chosen if n not in ds.splits]
            if missing or not chosen:
                raise ds.fail(f"task_options.splits.{split}={overrides[split]!r}: no split {missing or chosen}; "
                              f"the dataset has {have}")
            out[split] = chosen
            continue
        found = next((n for n in names if n in ds.splits), None)
        if found is None:
            if split in optional:
                continue
            raise ds.fail(f"no {split} split (looked for {', '.join(names)}); the dataset has {have}; set "
                          f"task_options.splits.{split}=<name>")
        out[split] = [found]
    return out


def resolve_columns(ds: HFDataset, splits: Sequence[str], fields: dict[str, Field],
                    overrides: dict[str, str] | None) -> dict[str, str]:
    """Field -> column, the same in every split read: ``task_options.columns.<field>``, else the first published name
    found. A required field without a column is a one-line error listing the dataset's columns; an optional one is
    left out."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise DataError(f"task_options.columns: unknown field(s) {unknown}; this task reads {', '.join(fields)}")
    columns = [ds.splits[s].columns for s in splits]
    common = [c for c in columns[0] if all(c in cols for cols in columns[1:])]
    out = {}
    for name, spec in fields.items():
        if name in overrides:
            if overrides[name] not in common:
                raise ds.fail(f"task_options.columns.{name}={overrides[name]!r}: no such column in split(s) "
                              f"{', '.join(splits)}; the dataset has columns {', '.join(common)}")
            out[name] = overrides[name]
            continue
        found = next((c for c in spec.columns if c in common), None)
        if found is not None:
            out[name] = found
        elif spec.required:
            raise ds.fail(f"no column for the {name} field (looked for {', '.join(spec.columns)}); the dataset has "
                          f"columns {', '.join(common)}; set task_options.columns.{name}=<column>")
    return out


# ----------------------------------------------------------------------------------------------- rows -> utterances


@dataclass
class _Row:
    split: str  # the dataset's split
    index: int  # row index in that split
    path: str  # row reference or audio file
    duration_s: float
    values: dict  # field -> value (ClassLabel names resolved)
    name: str | None  # file or audio path the id may come from


def _label_names(feature) -> list[str] | None:
    from datasets import ClassLabel

    return list(feature.names) if isinstance(feature, ClassLabel) else None


def _label(value: Any, names: list[str] | None) -> Any:
    """A stored value as the task sees it: a ClassLabel integer becomes its name (-1, datasets' missing label,
    becomes None)."""
    if names is None or not isinstance(value, int):
        return value
    return names[value] if 0 <= value < len(names) else None


def _audio_info(kind: str, payload: Any, base: Path) -> tuple[float, str | None]:
    """Duration of one stored audio value, and the file path when the value points at a file."""
    import soundfile as sf

    if kind == "empty":
        raise DataError("holds no audio (no bytes and no path)")
    if kind == "array":
        array, sr = payload
        if array.ndim != 1:
            raise DataError(f"holds an array of shape {array.shape}; expected mono audio")
        if array.size == 0:
            raise DataError("holds empty audio (0 samples)")
        return array.shape[0] / sr, None
    file = None
    if kind == "path":
        file = Path(payload) if Path(payload).is_absolute() else base / payload
        if not file.is_file():
            raise DataError(f"has no bytes and its path {payload!r} is not a file")
        payload = str(file)
    else:
        payload = io.BytesIO(payload)
    try:
        info = sf.info(payload)
    except Exception as e:  # soundfile raises several types; one clear message for all
        raise DataError(f"is not readable audio ({_one_line(e)})") from None
    if info.channels != 1:
        raise DataError(f"holds {info.channels}-channel audio; expected mono")
    if info.frames <= 0:
        raise DataError("holds empty audio (0 samples)")
    return info.frames / info.samplerate, str(file) if file else None


def _scan(ds: HFDataset, split: str, columns: dict[str, str], required: set[str]) -> Iterator[_Row]:
    """Stream one dataset split's rows, a record batch at a time: field values, the audio's duration and a reference
    to it (row errors name the split, the row and its id)."""
    info = ds.splits[split]
    names = {f: _label_names(info.features[c]) for f, c in columns.items()}
    audio_col = columns["audio"]
    base = Path(ds.where).expanduser() if is_local_hf_location(ds.where) else ds.audio_root
    index = 0
    for file in info.files:
        rel = os.path.relpath(file, ds.audio_root)
        batch_no, start = 0, 0
        while True:
            batches = _FILES.table(file).to_batches()  # reopened after a remap: batches are views of the mapping
            if batch_no >= len(batches):
                break
            batch = batches[batch_no]
            del batches
            values = {f: batch.column(c).to_pylist() for f, c in columns.items() if f != "audio"}
            audio = batch.column(audio_col)
            for j in range(batch.num_rows):
                row = {f: _label(v[j], names[f]) for f, v in values.items()}
                where = f"split {split!r} row {index}" + (f" (id {row['id']})" if row.get("id") is not None else "")
                for f in sorted(required & set(row)):
                    if row[f] is None or row[f] == "":
                        raise ds.fail(f"{where}: no {f} (column {columns[f]!r} is empty)")
                value = audio[j].as_py()
                try:
                    kind, payload = _audio_payload(value)
                    duration, file_path = _audio_info(kind, payload, base)
                except DataError as e:
                    raise ds.fail(f"{where}: column {audio_col!r} {e}") from None
                stored = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
                yield _Row(split, index, file_path or row_reference(rel, audio_col, start + j), duration, row,
                           row.get("file") or stored)
                index += 1
            start += batch.num_rows
            batch_no += 1
            nbytes = batch.nbytes
            del batch, audio, values  # before counting: a remap must find no batch in use
            _FILES.count(nbytes)


def _unique_suffixes(names: Sequence[str], min_components: int) -> list[str] | None:
    """The shortest trailing part (at least ``min_components`` path components, extension dropped) that tells every
    name apart; None if even the whole names repeat."""
    parts = [str(Path(n.replace("\\", "/")).with_suffix("")).split("/") for n in names]
    longest = max((len(p) for p in parts), default=0)
    for k in range(min(min_components, max(longest, 1)), longest + 1):
        ids = ["/".join(p[-k:]) for p in parts]
        if len(set(ids)) == len(ids):
            return ids
    return None


def utterances(ds: HFDataset, split_map: dict[str, list[str]], columns: dict[str, str], fields: dict[str, Field],
               id_components: int = 1, speaker_of: Callable[[str], str] | None = None) -> dict[str, list[Utterance]]:
    """Task split -> utterances read from the mapped dataset splits (in dataset order).

    ``columns`` maps fields to columns (:func:`resolve_columns`); ``audio``, ``id``, ``file`` and ``speaker`` are
    special, every other field becomes a label. Ids: the ``id`` column; else the ``file`` column or the audio's stored
    path (the shortest unique trailing part with at least ``id_components`` components, extension dropped); else
    ``<fingerprint>-<split>-<row>``. Speakers: the ``speaker`` column, else ``speaker_of(id)``, else ``""``.
    Durations are rounded to 4 decimals, as manifests store them.
    """
    required = {f for f, spec in fields.items() if spec.required} | ({"id"} & set(columns))
    out = {}
    for task_split, names in split_map.items():
        rows = [row for name in names for row in _scan(ds, name, columns, required)]
        ids = _row_ids(ds, rows, columns, id_components)
        utts = []
        for uid, row in zip(ids, rows, strict=True):
            values = row.values
            speaker = values.get("speaker")
            speaker = str(speaker) if speaker not in (None, "") else (speaker_of(uid) if speaker_of else "")
            labels = {f: v for f, v in values.items() if f not in ("id", "file", "speaker") and v is not None}
            utts.append(Utterance(uid, row.path, round(row.duration_s, 4), speaker, task_split, labels))
        out[task_split] = utts
    return out


def _row_ids(ds: HFDataset, rows: list[_Row], columns: dict[str, str], id_components: int) -> list[str]:
    if "id" in columns:
        ids = [str(r.values["id"]) for r in rows]
    else:
        names = [r.name for r in rows]
        ids = _unique_suffixes(names, id_components) if names and all(names) else None
        if ids is None:
            return [f"{ds.splits[r.split].fingerprint[:8]}-{r.split}-{r.index}" for r in rows]
    seen: dict[str, _Row] = {}
    for uid, row in zip(ids, rows, strict=True):
        if uid in seen:
            first = seen[uid]
            raise ds.fail(f"id {uid!r} is used twice (split {first.split!r} row {first.index} and split "
                          f"{row.split!r} row {row.index}); ids must be unique")
        seen[uid] = row
    return ids


AUDIO_FIELDS = {"audio": Field(("audio",)), "id": Field(("id",), False), "file": Field(("file",), False)}


@dataclass
class TaskRows:
    """A task's splits read from a dataset, and what the result records about it (``record``: where, the splits and
    columns used, their fingerprints, plus the task's ``notes`` and ``deviations`` about the dataset's layout)."""

    dataset: HFDataset
    splits: dict[str, list[Utterance]]
    record: dict

    @property
    def corpus(self) -> str:
        """``synth`` for the synthetic corpus' export (it then behaves as the synthetic corpus), else ``hf:<name>``."""
        return "synth" if self.dataset.synthetic else f"{HF_PREFIX}{self.dataset.name}"

    @property
    def folder(self) -> Path | None:
        """The dataset's folder (where files beside it, such as trial lists or lexicons, are found); None for a hub
        id."""
        return Path(self.dataset.where).expanduser() if is_local_hf_location(self.dataset.where) else None

    def info(self, **extra) -> dict:
        return {"root": f"{HF_PREFIX}{self.dataset.where}", **extra, "hf": self.record}


def read_task_rows(root: str, fields: dict[str, Field], splits: dict[str, tuple[str, ...]], options: Any,
                   optional: Sequence[str] = (), id_components: int = 1,
                   speaker_of: Callable[[str], str] | None = None, dataset: HFDataset | None = None) -> TaskRows:
    """Open ``hf:<where>``, map the task's splits and fields (with ``options.splits`` / ``options.columns``) and read
    every row (:func:`utterances`). ``fields`` are the task's own; ``audio``, ``id`` and ``file`` are added."""
    ds = dataset or open_dataset(root)
    fields = {**AUDIO_FIELDS, **fields}
    split_map = resolve_splits(ds, splits, options.splits, optional)
    columns = resolve_columns(ds, [n for names in split_map.values() for n in names], fields, options.columns)
    utts = utterances(ds, split_map, columns, fields, id_components, speaker_of)
    used = [n for names in split_map.values() for n in names]
    record = {"source": "hf", "dataset": f"{HF_PREFIX}{ds.where}", "name": ds.name, "splits": split_map,
              "columns": columns, "rows": {n: ds.splits[n].num_rows for n in used},
              "fingerprints": {n: ds.splits[n].fingerprint for n in used}, "notes": [], "deviations": []}
    return TaskRows(ds, utts, record)


# ----------------------------------------------------------------------------------------------- writing


@dataclass
class Column:
    """A column to write: its values and its ``datasets`` feature (Audio, ClassLabel, Value ...; None: the values'
    own type)."""

    values: list
    feature: Any = None


def build_dataset(columns: dict[str, Column], dataset_name: str = "", description: str = "",
                  config_name: str | None = None):
    """A ``datasets.Dataset`` from plain columns, without encoding through ``datasets`` (whose Audio encoder needs
    torchcodec): audio values are ``{"bytes", "path"}`` dicts (or None), ClassLabel values are names or ints."""
    import pyarrow as pa
    from datasets.features.features import generate_from_arrow_type, get_nested_type

    datasets = _datasets()
    arrays, features = {}, {}
    for name, col in columns.items():
        if col.feature is None:  # the Arrow type of the values (str -> string, int -> int64 ...)
            arrays[name] = pa.array(col.values)
            features[name] = generate_from_arrow_type(arrays[name].type)
            continue
        values = col.values
        if isinstance(col.feature, datasets.ClassLabel):
            values = [col.feature.str2int(v) if isinstance(v, str) else v for v in values]
        arrays[name], features[name] = pa.array(values, type=get_nested_type(col.feature)), col.feature
    info = datasets.DatasetInfo(features=datasets.Features(features), dataset_name=dataset_name or None,
                                description=description, config_name=config_name)
    return datasets.Dataset(pa.table(arrays), info=info)


def save_dataset_dict(splits: dict, out: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``{split: Dataset}`` with ``save_to_disk`` into ``out`` (plus ``extra_files``: name -> text, beside
    ``dataset_dict.json``): built in a temporary folder beside it and renamed into place, so ``out`` is either
    absent or complete."""
    datasets = _datasets()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        datasets.DatasetDict(splits).save_to_disk(str(tmp))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
