"""IC: intent classification, Fluent Speech Commands protocol (action + object + location, accuracy).

Real corpus: ``--data-root`` is ``fluent_speech_commands_dataset/`` with ``data/{train,valid,test}_data.csv``
(columns: an unnamed index, ``path``, ``speakerId``, ``transcription``, ``action``, ``object``, ``location``;
``path`` relative to the root, e.g. ``wavs/speakers/<spk>/<file>.wav``) and the wav files. Splits are the csv
files (valid = dev). The label space of each slot is built from the training csv; a test label never seen in
training cannot be predicted and counts as wrong.

Head (SUPERB): Linear(D, 256) -> masked mean over time -> ONE Linear producing the concatenated action, object
and location logits; loss = sum of the three cross-entropies. The metric counts an utterance only when all three
slots are right; per-slot accuracies are reported beside it.

Synthetic corpus: ``ic/{train,dev,test}.jsonl`` of the generated corpus (commands with paraphrases, test speakers
unseen in training), same label fields.

Hugging Face dataset (``--data-root hf:...``, :mod:`downstreams.hf_data`): the published columns of ``superb`` (config
``ic``): ``audio``, ``action``, ``object``, ``location`` (ClassLabels or strings), optionally ``speaker_id``, ``text``,
``id`` and ``file``; splits ``train``, ``validation`` (dev), ``test`` (the three csv files).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from speechbench.common import atomic_write_text, hf_location
from speechbench.downstreams.data import (
    DataError,
    Utterance,
    audio_duration_s,
    expect_path,
    read_manifest,
)
from speechbench.downstreams.heads import UtteranceLevelHead
from speechbench.downstreams.hf_data import Field, read_task_rows
from speechbench.downstreams.metrics import all_fields_accuracy_percent, field_accuracy_percent
from speechbench.downstreams.tasks import PreparedData, Task, correct_items, register_task

SLOTS = ("action", "object", "location")
REAL_CORPUS = "fluent_speech_commands_dataset"
OFFICIAL_TEST_UTTERANCES = 3793  # data/test_data.csv
CSV_FILES = {"train": "train_data.csv", "dev": "valid_data.csv", "test": "test_data.csv"}
CSV_COLUMNS = ("path", "speakerId", "transcription") + SLOTS

Vocab = tuple[tuple[str, ...], ...]  # one tuple of label names per slot, in SLOTS order


# The published layout, from huggingface/datasets' datasets/superb/superb.py before the scripts moved to the hub
# (commit d7dfbc83), config "ic": file, audio, speaker_id, text, action, object, location (ClassLabels), splits
# train/validation/test read from train/valid/test_data.csv.
HF_FIELDS = {**{s: Field((s,)) for s in SLOTS}, "text": Field(("text", "transcription"), required=False),
             "speaker": Field(("speaker_id", "speakerId"), required=False)}
HF_SPLITS = {"train": ("train",), "dev": ("validation", "valid", "dev"), "test": ("test",)}


@dataclass(frozen=True)
class ICOptions:
    projector_dim: int = 256
    # Hugging Face datasets: field -> column and split -> dataset split(s), for names other than the published ones
    columns: dict[str, str] = field(default_factory=dict, metadata={"protocol": "neutral"})
    splits: dict[str, str] = field(default_factory=dict, metadata={"protocol": "neutral"})


def read_fsc_csv(root: Path, csv_path: Path, split: str) -> list[Utterance]:
    """One split of the Fluent Speech Commands layout: its csv rows as utterances (durations from the wavs)."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{csv_path}: expected columns {', '.join(CSV_COLUMNS)} of the {REAL_CORPUS} layout, "
                            f"missing {', '.join(missing)}; found {', '.join(h or '<unnamed>' for h in header)}")
        utts = []
        for line_no, row in enumerate(reader, 2):
            if any(row.get(c) is None for c in CSV_COLUMNS):
                raise DataError(f"{csv_path}:{line_no}: row has fewer fields than the header")
            rel = row["path"].strip()
            duration = audio_duration_s(root / rel, csv_path)
            labels = {s: row[s].strip() for s in SLOTS}
            labels["text"] = row["transcription"].strip()
            utts.append(Utterance(str(Path(rel).with_suffix("")), rel, duration, row["speakerId"].strip(), split,
                                  labels))
    if not utts:
        raise DataError(f"{csv_path}: no rows; expected the {split} utterances of the {REAL_CORPUS} layout")
    return utts


def prepare_real(root: Path) -> dict[str, list[Utterance]]:
    """Manifests for the real Fluent Speech Commands layout (see the module docstring)."""
    expect_path(root, "the corpus folder", REAL_CORPUS)
    data_dir = expect_path(root / "data", "the data/ folder with the split csv files", REAL_CORPUS)
    return {split: read_fsc_csv(root, expect_path(data_dir / name, name, REAL_CORPUS), split)
            for split, name in CSV_FILES.items()}


def label_space(train: Sequence[Utterance]) -> Vocab:
    """Each slot's labels, sorted, as seen in the training split."""
    return tuple(tuple(sorted({u.labels[s] for u in train})) for s in SLOTS)


def prepare(data_cfg: Any, options: ICOptions) -> PreparedData:
    if data_cfg.corpus == "synth":
        from speechbench.downstreams.synth.corpus import ensure_corpus

        corpus_dir = ensure_corpus(data_cfg.profile, data_cfg.synth_seed)
        splits = {s: read_manifest(corpus_dir / "ic" / f"{s}.jsonl") for s in ("train", "dev", "test")}
        return PreparedData(corpus_dir, splits, "synth", label_space(splits["train"]),
                            {"profile": data_cfg.profile, "root": str(corpus_dir)})
    if hf_location(data_cfg.root) is not None:
        rows = read_task_rows(data_cfg.root, HF_FIELDS, HF_SPLITS, options)
        return PreparedData(rows.dataset.audio_root, rows.splits, rows.corpus, label_space(rows.splits["train"]),
                            rows.info())
    if not data_cfg.root:
        raise DataError(f"IC on the real corpus needs --data-root pointing at {REAL_CORPUS}/")
    root = Path(data_cfg.root)
    splits = prepare_real(root)
    return PreparedData(root, splits, REAL_CORPUS, label_space(splits["train"]), {"root": str(root)})


@dataclass(frozen=True)
class SlotLogits:
    """The IC head's output: concatenated logits ``[B, sum of slot sizes]`` and each slot's label names."""

    logits: torch.Tensor
    vocab: Vocab

    def per_slot(self) -> tuple[torch.Tensor, ...]:
        return self.logits.split([len(v) for v in self.vocab], dim=-1)


class IntentHead(UtteranceLevelHead):
    """SUPERB's IC head: the utterance-level head with one classifier over the concatenated slot logits."""

    def __init__(self, input_dim: int, projector_dim: int, vocab: Vocab):
        super().__init__(input_dim, projector_dim, sum(len(v) for v in vocab))
        self.vocab = vocab

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> SlotLogits:
        return SlotLogits(super().forward(x, lengths), self.vocab)


def build_head(input_dim: int, prepared: PreparedData, options: ICOptions) -> torch.nn.Module:
    return IntentHead(input_dim, options.projector_dim, prepared.label_space)


def targets(utterances: Sequence[Utterance], prepared: PreparedData) -> torch.Tensor:
    """``[N, 3]`` class indices (action, object, location) in the training label space."""
    index = [{c: i for i, c in enumerate(names)} for names in prepared.label_space]
    try:
        return torch.tensor([[index[k][u.labels[s]] for k, s in enumerate(SLOTS)] for u in utterances],
                            dtype=torch.long)
    except KeyError as e:
        raise DataError(f"IC: label {e.args[0]!r} is not in the training label space") from None


def loss(output: SlotLogits, target: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(logits, target[:, k]) for k, logits in enumerate(output.per_slot()))


def predict(output: SlotLogits, lengths: torch.Tensor | None = None) -> list[tuple[str, str, str]]:
    per_slot = [[names[i] for i in logits.argmax(dim=-1).tolist()]
                for names, logits in zip(output.vocab, output.per_slot(), strict=True)]
    return list(zip(*per_slot, strict=True))


def references(utterances: Sequence[Utterance], prepared: PreparedData) -> list[tuple[str, str, str]]:
    return [tuple(u.labels[s] for s in SLOTS) for u in utterances]


def score(predictions: list, refs: list) -> dict:
    """``accuracy``: all three slots right; ``<slot>_accuracy``: one slot at a time (all in %)."""
    out = {"accuracy": all_fields_accuracy_percent(predictions, refs)}
    for k, slot in enumerate(SLOTS):
        out[f"{slot}_accuracy"] = field_accuracy_percent(predictions, refs, k)
    return out


def write_outputs(run_dir: Path, utterances: Sequence[Utterance], predictions: list, refs: list) -> None:
    """``predictions.tsv``: id, the three predicted slots, the three reference slots, 1 if all three are right."""
    header = "\t".join(["id", *SLOTS, *(f"ref_{s}" for s in SLOTS), "correct"]) + "\n"
    atomic_write_text(run_dir / "predictions.tsv", header + "".join(
        "\t".join([u.id, *p, *r, str(int(tuple(p) == tuple(r)))]) + "\n"
        for u, p, r in zip(utterances, predictions, refs, strict=True)))


def protocol(prepared: PreparedData, options: ICOptions) -> tuple[dict, list[str]]:
    """Facts: the official test size on the real corpus (no run-time deviation is possible here)."""
    return ({} if prepared.corpus == "synth" else {"test_official": OFFICIAL_TEST_UTTERANCES}), []


TASK = register_task(Task(
    name="ic", metric="accuracy", unit="%", higher_is_better=True, granularity="pooled",
    options_cls=ICOptions, prepare=prepare, targets=targets, build_head=build_head, loss=loss,
    predict=predict, references=references, score=score,
    summary="intent classification (action, object, location), accuracy with all three slots right",
    real_corpus=REAL_CORPUS, write_outputs=write_outputs, protocol=protocol, item_scores=correct_items,
))
