"""ER: emotion recognition, IEMOCAP protocol (4 classes, leave-one-session-out, mean accuracy of 5 folds).

Real corpus: ``--data-root`` is ``IEMOCAP_full_release/`` with ``Session1..5/sentences/wav/<dialog>/<utt>.wav``
and the labels in ``Session<k>/dialog/EmoEvaluation/<dialog>.txt``, whose summary lines read
``[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]`` (the evaluators' detail lines
below them, the header line and the ``Categorical/``, ``Attribute/``, ``Self-evaluation/`` subfolders are ignored).
Kept: neu, hap, ang, sad, with exc merged into hap (5,531 utterances); everything else (fru, sur, xxx, ...) is
dropped.

Fold k (``task_options.fold``, 1..5) tests on Session k and trains on the other four; dev is a seeded
``dev_fraction`` (20 %) of that training part. ``bench run --task er`` runs all five folds, ``--fold K`` one;
each fold writes its own result row and the ER number is the mean of the five test accuracies.

Head (SUPERB): Linear(D, 256) -> masked mean over time -> Linear(256, 4).

Synthetic corpus: ``er/utterances.jsonl`` of the generated corpus (emotions as prosody and voice quality relative to
each speaker; rows with ``emotion`` and ``fold`` 1..5 in speaker-disjoint folds); fold k tests on the rows of
fold k, dev is the same seeded fraction of the other folds.

Hugging Face dataset (``--data-root hf:...``, :mod:`downstreams.hf_data`): the published layout of ``superb`` (config
``er``): one split per session, ``session1`` .. ``session5`` (the folds), columns ``audio`` and ``label`` (neu, hap,
ang, sad: its loading script already merged exc into hap), optionally ``speaker_id``, ``id`` and ``file``. A dataset
without session splits needs a session column (``session`` or ``fold``, values 1..5 or ``Session1`` ...); its rows
are read from every split. Labels may also be spelled out (neutral, happy, angry, sad, excited); exc is merged into
hap and every other label is dropped (counted in the result's ``data.dropped_labels``). Without a speaker column,
IEMOCAP names give the speaker (``Ses01F_impro01_M000`` -> ``Ses01M``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from speechbench.common import hf_location
from speechbench.downstreams.data import DataError, Utterance, audio_duration_s, expect_path, read_manifest
from speechbench.downstreams.heads import UtteranceLevelHead
from speechbench.downstreams.hf_data import Field, TaskRows, open_dataset, read_task_rows
from speechbench.downstreams.metrics import accuracy_percent
from speechbench.downstreams.tasks import PreparedData, Task, correct_items, register_task

CLASSES = ("neu", "hap", "ang", "sad")
MERGE = {"exc": "hap"}
FOLDS = (1, 2, 3, 4, 5)
REAL_CORPUS = "IEMOCAP_full_release"
# 4-class utterances (neu, hap + exc, ang, sad) per session: the test set of each fold, 5,531 in all
OFFICIAL_TEST_UTTERANCES = {1: 1085, 2: 1023, 3: 1151, 4: 1031, 5: 1241}
# "[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]"
_SUMMARY_LINE = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(Ses\w+)\s+(\w+)\s+\[")


# The published layout, from huggingface/datasets' datasets/superb/superb.py before the scripts moved to the hub
# (commit d7dfbc83), config "er": file, audio, label = ClassLabel(neu, hap, ang, sad) with exc merged into hap by the
# script; one split per session, session1 .. session5.
HF_FIELDS = {"emotion": Field(("label", "emotion")), "speaker": Field(("speaker_id", "speaker"), required=False),
             "fold": Field(("session", "fold"), required=False), "text": Field(("text",), required=False)}
HF_SPLITS = {f"fold{k}": (f"session{k}", f"Session{k}", f"fold{k}") for k in FOLDS}
EMOTION_NAMES = {"neutral": "neu", "happy": "hap", "happiness": "hap", "angry": "ang", "anger": "ang",
                 "sadness": "sad", "excited": "exc", "excitement": "exc"}
_IEMOCAP_NAME = re.compile(r"^(Ses\d\d)[FM]_.*_([FM])\d+$")


@dataclass(frozen=True)
class EROptions:
    # leave-one-session-out fold: test on Session <fold>
    fold: int = field(default=1, metadata={"protocol": "neutral"})
    projector_dim: int = 256
    dev_fraction: float = 0.2  # share of the fold's training part held out as dev
    dev_seed: int = 0  # seeds the dev draw (together with the fold)
    # Hugging Face datasets: field -> column and split (fold1 .. fold5) -> dataset split(s), for other names
    columns: dict[str, str] = field(default_factory=dict, metadata={"protocol": "neutral"})
    splits: dict[str, str] = field(default_factory=dict, metadata={"protocol": "neutral"})


def parse_emo_evaluation(path: Path) -> list[tuple[str, str]]:
    """One ``EmoEvaluation/<dialog>.txt`` file -> [(utterance name, emotion code)] from its summary lines."""
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _SUMMARY_LINE.match(line)
        if m:
            out.append((m.group(3), m.group(4)))
    return out


def read_session(root: Path, session: int) -> list[Utterance]:
    """The kept (4-class) utterances of one IEMOCAP session, in name order; paths relative to ``root``."""
    session_dir = expect_path(root / f"Session{session}", f"the folder Session{session}/", REAL_CORPUS)
    eval_dir = expect_path(session_dir / "dialog" / "EmoEvaluation", "the label folder dialog/EmoEvaluation/",
                           REAL_CORPUS)
    wav_root = expect_path(session_dir / "sentences" / "wav", "the audio folder sentences/wav/", REAL_CORPUS)
    label_files = sorted(p for p in eval_dir.glob("*.txt") if not p.name.startswith("."))
    if not label_files:
        raise DataError(f"{eval_dir}: expected <dialog>.txt label files of the {REAL_CORPUS} layout, found none")
    utts, seen = [], 0
    for label_file in label_files:
        dialog = label_file.stem
        for name, code in parse_emo_evaluation(label_file):
            seen += 1
            emotion = MERGE.get(code, code)
            if emotion not in CLASSES:
                continue
            rel = f"Session{session}/sentences/wav/{dialog}/{name}.wav"
            if not (root / rel).is_file():
                expect_path(wav_root / dialog, f"the dialog folder {dialog}/ (labelled in {label_file.name})",
                            REAL_CORPUS)
            duration = audio_duration_s(root / rel, label_file)
            gender = name.rsplit("_", 1)[-1][:1]
            utts.append(Utterance(name, rel, duration, f"Ses{session:02d}{gender}", "", {
                "emotion": emotion, "fold": session, "session": session}))
    if not seen:
        raise DataError(f"{eval_dir}: no summary lines like '[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>"
                        f"[2.5000, 2.5000, 2.5000]' in its {len(label_files)} .txt files")
    return sorted(utts, key=lambda u: u.id)


def prepare_real(root: Path) -> list[Utterance]:
    """Every kept utterance of the real IEMOCAP layout (see the module docstring), labelled with its fold."""
    expect_path(root, "the corpus folder", REAL_CORPUS)
    return [u for session in FOLDS for u in read_session(root, session)]


def split_fold(utterances: Sequence[Utterance], fold: int, dev_fraction: float = 0.2, dev_seed: int = 0,
               ) -> dict[str, list[Utterance]]:
    """Leave-one-fold-out: test = rows whose ``fold`` label is ``fold``; dev = a seeded ``dev_fraction`` of the rest
    (drawn by ``np.random.default_rng([dev_seed, fold])``), train = the remainder. Order within a split is kept."""
    if fold not in FOLDS:
        raise DataError(f"ER fold must be one of {', '.join(map(str, FOLDS))}, got {fold}")
    if not 0.0 < dev_fraction < 1.0:
        raise DataError(f"ER dev_fraction must be between 0 and 1, got {dev_fraction}")
    test = [u for u in utterances if int(u.labels["fold"]) == fold]
    pool = [u for u in utterances if int(u.labels["fold"]) != fold]
    if not test or not pool:
        raise DataError(f"ER fold {fold}: {len(test)} test and {len(pool)} training utterances; need both")
    order = sorted(range(len(pool)), key=lambda i: pool[i].id)
    n_dev = max(1, int(round(dev_fraction * len(pool))))
    dev_idx = {order[i] for i in np.random.default_rng([dev_seed, fold]).permutation(len(pool))[:n_dev]}
    splits: dict[str, list[Utterance]] = {"train": [], "dev": [], "test": []}
    for i, u in enumerate(pool):
        split = "dev" if i in dev_idx else "train"
        splits[split].append(dataclasses.replace(u, split=split))
    splits["test"] = [dataclasses.replace(u, split="test") for u in test]
    return splits


def _iemocap_speaker(uid: str) -> str:
    m = _IEMOCAP_NAME.match(Path(uid).name)
    return f"{m[1]}{m[2]}" if m else ""


def _fold(value: object) -> int | None:
    digits = re.search(r"(\d+)$", str(value))
    return int(digits[1]) if digits and int(digits[1]) in FOLDS else None


def prepare_hf(root: str, options: EROptions) -> tuple[list[Utterance], TaskRows]:
    """Every kept utterance of a Hugging Face dataset (module docstring), labelled with its fold."""
    ds = open_dataset(root)
    by_session = options.splits or any(n in ds.splits for names in HF_SPLITS.values() for n in names)
    splits = HF_SPLITS if by_session else {name: (name,) for name in ds.splits}
    fields = HF_FIELDS if by_session else {**HF_FIELDS, "fold": Field(HF_FIELDS["fold"].columns)}
    rows = read_task_rows(root, fields, splits, options, speaker_of=_iemocap_speaker, dataset=ds)
    utts, dropped = [], {}
    for split, split_utts in rows.splits.items():
        for u in split_utts:
            fold = _fold(split) if by_session else _fold(u.labels["fold"])
            if fold is None:
                raise ds.fail(f"utterance {u.id}: session {u.labels['fold']!r} (column "
                              f"{rows.record['columns']['fold']!r}) is not one of {', '.join(map(str, FOLDS))}")
            code = str(u.labels["emotion"]).strip().lower()
            code = EMOTION_NAMES.get(code, code)
            emotion = MERGE.get(code, code)
            if emotion not in CLASSES:
                dropped[code] = dropped.get(code, 0) + 1
                continue
            session = {} if rows.corpus == "synth" else {"session": fold}  # as the native layouts label them
            utts.append(dataclasses.replace(u, split="", labels={**u.labels, "emotion": emotion, "fold": fold,
                                                                 **session}))
    rows.record["notes"].append("folds: one split per session" if by_session else
                                f"folds: the session column {rows.record['columns']['fold']!r} of every split")
    if dropped:
        rows.record["notes"].append(f"labels outside the four classes dropped: {dropped}")
    rows.record["dropped_labels"] = dropped
    return utts, rows


def prepare(data_cfg: Any, options: EROptions) -> PreparedData:
    if data_cfg.corpus == "synth":
        from speechbench.downstreams.synth.corpus import ensure_corpus

        corpus_dir = ensure_corpus(data_cfg.profile, data_cfg.synth_seed)
        utts = read_manifest(corpus_dir / "er" / "utterances.jsonl")
        splits = split_fold(utts, options.fold, options.dev_fraction, options.dev_seed)
        return PreparedData(corpus_dir, splits, "synth", CLASSES,
                            {"profile": data_cfg.profile, "root": str(corpus_dir), "fold": options.fold})
    if hf_location(data_cfg.root) is not None:
        utts, rows = prepare_hf(data_cfg.root, options)
        splits = split_fold(utts, options.fold, options.dev_fraction, options.dev_seed)
        return PreparedData(rows.dataset.audio_root, splits, rows.corpus, CLASSES,
                            rows.info(fold=options.fold, test_session=options.fold))
    if not data_cfg.root:
        raise DataError(f"ER on the real corpus needs --data-root pointing at {REAL_CORPUS}/")
    root = Path(data_cfg.root)
    splits = split_fold(prepare_real(root), options.fold, options.dev_fraction, options.dev_seed)
    return PreparedData(root, splits, REAL_CORPUS, CLASSES,
                        {"root": str(root), "fold": options.fold, "test_session": options.fold})


def targets(utterances: Sequence[Utterance], prepared: PreparedData) -> torch.Tensor:
    index = {c: i for i, c in enumerate(prepared.label_space)}
    return torch.tensor([index[u.labels["emotion"]] for u in utterances], dtype=torch.long)


def build_head(input_dim: int, prepared: PreparedData, options: EROptions) -> torch.nn.Module:
    return UtteranceLevelHead(input_dim, options.projector_dim, len(prepared.label_space))


def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def predict(logits: torch.Tensor, lengths: torch.Tensor | None = None) -> list[str]:
    return [CLASSES[i] for i in logits.argmax(dim=-1).tolist()]


def references(utterances: Sequence[Utterance], prepared: PreparedData) -> list[str]:
    return [u.labels["emotion"] for u in utterances]


def score(predictions: list, refs: list) -> dict:
    return {"accuracy": accuracy_percent(predictions, refs)}


def protocol(prepared: PreparedData, options: EROptions) -> tuple[dict, list[str]]:
    """Facts: the fold, the number of folds the ER number averages, and the fold's official test size."""
    facts: dict = {"fold": options.fold, "folds": len(FOLDS)}
    if prepared.corpus != "synth":
        facts["test_official"] = OFFICIAL_TEST_UTTERANCES.get(options.fold)
    return facts, []


TASK = register_task(Task(
    name="er", metric="accuracy", unit="%", higher_is_better=True, granularity="pooled",
    options_cls=EROptions, prepare=prepare, targets=targets, build_head=build_head, loss=loss,
    predict=predict, references=references, score=score,
    summary="emotion recognition, 4 classes (exc merged into hap), 5 leave-one-session-out folds, mean accuracy",
    real_corpus=REAL_CORPUS, folds=FOLDS, protocol=protocol, item_scores=correct_items,
))
