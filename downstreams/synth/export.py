"""Export the synthetic corpus as Hugging Face datasets: ``bench data synth --out DIR --format hf``.

Writes ``DIR/hf/<task>/``, one ``save_to_disk`` folder per task (``pr`` holds the same rows as ``asr``), with the
published column and split names of the task's best-known hub dataset (``downstreams/hf_data.py`` and each task's
``HF_FIELDS``), an ``id`` column with the native ids, and the audio as the corpus' wav bytes in an ``Audio`` column
(``{"bytes", "path"}``, readable with ``Audio(decode=False)``):

=====  ======================================  =========================================================
task   splits                                  columns
=====  ======================================  =========================================================
ks     train, validation, test                 id, file, audio, label (superb's 12 ClassLabel names), speaker_id
ic     train, validation, test                 id, file, audio, speaker_id, text, action, object, location
sid    train, validation, test                 id, file, audio, label (one ClassLabel name per speaker), text
er     session1 .. session5 (the folds)        id, file, audio, label (neu, hap, ang, sad), speaker_id, text
asr    train, validation, test                 id, file, audio, text, speaker_id, phonemes (also ``pr``)
asv    train, validation, test                 id, file, audio, speaker_id, text; dev_trials.txt, test_trials.txt
=====  ======================================  =========================================================

Every split's ``DatasetInfo.dataset_name`` is ``speechbench-synth``: read back with ``--data-root hf:DIR/hf/<task>``
it is recognised as the synthetic corpus and gives the same manifests and numbers as the native layout.
"""

from __future__ import annotations

import os
from pathlib import Path

from speechbench.downstreams.data import DataError, Utterance, read_manifest
from speechbench.downstreams.hf_data import SYNTH_DATASET_NAME, Column, build_dataset, save_dataset_dict

KS_LABELS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "_silence_", "_unknown_")  # superb
ER_LABELS = ("neu", "hap", "ang", "sad")  # superb er
SPLIT_NAMES = {"train": "train", "dev": "validation", "test": "test"}


def _splits(corpus_dir: Path, task: str) -> dict[str, list[Utterance]]:
    """Dataset split name -> the native manifest's utterances (ER: one split per fold, ``session<k>``)."""
    if task == "er":
        by_fold: dict[str, list[Utterance]] = {}
        for u in read_manifest(corpus_dir / "er" / "utterances.jsonl"):
            by_fold.setdefault(f"session{int(u.labels['fold'])}", []).append(u)
        return dict(sorted(by_fold.items()))
    source = "asr" if task == "pr" else task
    return {SPLIT_NAMES[s]: read_manifest(corpus_dir / source / f"{s}.jsonl") for s in ("train", "dev", "test")}


def _columns(task: str, utts: list[Utterance], corpus_dir: Path, names: dict) -> dict[str, Column]:
    import datasets

    def audio(u: Utterance) -> dict:
        return {"bytes": (corpus_dir / u.path).read_bytes(), "path": Path(u.path).name}

    def label(field: str) -> list:
        return [u.labels[field] for u in utts]

    cols = {"id": Column([u.id for u in utts]), "file": Column([u.path for u in utts]),
            "audio": Column([audio(u) for u in utts], datasets.Audio(sampling_rate=16000))}
    speakers = Column([u.speaker for u in utts])
    if task == "ks":
        cols.update(label=Column(label("keyword"), datasets.ClassLabel(names=list(KS_LABELS))), speaker_id=speakers)
    elif task == "ic":
        cols.update(speaker_id=speakers, text=Column(label("text")),
                    **{s: Column(label(s), datasets.ClassLabel(names=names[s])) for s in ("action", "object",
                                                                                         "location")})
    elif task == "sid":
        cols.update(label=Column([u.speaker for u in utts], datasets.ClassLabel(names=names["speaker"])),
                    text=Column(label("text")))
    elif task == "er":
        cols.update(label=Column(label("emotion"), datasets.ClassLabel(names=list(ER_LABELS))), speaker_id=speakers,
                    text=Column(label("text")))
    elif task in ("asr", "pr"):
        cols.update(text=Column(label("text")), speaker_id=speakers, phonemes=Column(label("phonemes")))
    else:  # asv
        cols.update(speaker_id=speakers, text=Column(label("text")))
    return cols


def export_hf(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
              tasks: tuple[str, ...] = ("ks", "ic", "sid", "er", "asr", "pr", "asv")) -> dict[str, Path]:
    """Write ``<out_dir>/<task>/`` (default ``<corpus_dir>/hf``) for every task; a complete folder is kept as it is
    (the corpus is deterministic). Returns task -> folder."""
    from speechbench.downstreams.synth.corpus import corpus_info

    corpus_dir = Path(corpus_dir)
    info = corpus_info(corpus_dir)
    out_dir = Path(out_dir) if out_dir is not None else corpus_dir / "hf"
    description = (f"speechbench synthetic corpus, task {{task}}, profile {info['profile']}, seed {info['seed']}, "
                   f"version {info['version']}: a smoke benchmark, not SUPERB numbers")
    written = {}
    for task in tasks:
        folder = out_dir / task
        written[task] = folder
        if (folder / "dataset_dict.json").is_file():
            continue
        if folder.exists():
            raise DataError(f"{folder} exists and is not a complete export; remove it to write the export again")
        splits = _splits(corpus_dir, task)
        everything = [u for utts in splits.values() for u in utts]
        names = {"speaker": sorted({u.speaker for u in everything}),
                 **{s: sorted({u.labels[s] for u in everything}) for s in ("action", "object", "location")
                    if task == "ic"}}
        built = {split: build_dataset(_columns(task, utts, corpus_dir, names), SYNTH_DATASET_NAME,
                                      description.format(task=task), task)
                 for split, utts in splits.items()}
        extra = {f"{s}_trials.txt": (corpus_dir / "asv" / f"{s}_trials.txt").read_text() for s in ("dev", "test")} \
            if task == "asv" else None
        save_dataset_dict(built, folder, extra)
    return written
