"""SID: speaker identification, VoxCeleb1 protocol (1,251 speakers, accuracy).

Real corpus: ``--data-root`` is the VoxCeleb1 folder holding ``wav/<speaker>/<video>/<utt>.wav`` and the official
``iden_split.txt`` (or ``task_options.split_file``), whose lines read ``<1|2|3> <speaker>/<video>/<utt>.wav``:
1 = train, 2 = dev, 3 = test. One class per training speaker; a test speaker never seen in training cannot be
predicted and counts as wrong.

Training uses random crops of ``task_options.train_crop_s`` seconds (SUPERB: 8 s; null = whole utterances);
evaluation always sees whole utterances. Random crops change an utterance's time-mean, so when any training
utterance is longer than the crop the runner trains on frames (cached or on the fly), not on pooled features.

Head (SUPERB): Linear(D, 256) -> masked mean over time -> Linear(256, speakers).

Synthetic corpus: ``sid/{train,dev,test}.jsonl`` of the generated corpus, a closed speaker set whose label is
each row's ``speaker``.

Hugging Face dataset (``--data-root hf:...``, :mod:`downstreams.hf_data`): the published columns of ``superb`` (config
``si``): ``audio`` and ``label`` (the speaker: a ClassLabel of id10001 .. id11251, or a string), optionally ``id``
and ``file`` (ids keep ``<speaker>/<video>/<utt>`` of the file path); splits ``train``, ``validation`` (dev),
``test``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from speechbench.common import hf_location, path_option
from speechbench.downstreams.data import DataError, Utterance, audio_duration_s, expect_path, read_manifest
from speechbench.downstreams.heads import UtteranceLevelHead
from speechbench.downstreams.hf_data import Field, read_task_rows
from speechbench.downstreams.metrics import accuracy_percent
from speechbench.downstreams.tasks import PreparedData, Task, correct_items, register_task

REAL_CORPUS = "VoxCeleb1"
OFFICIAL_TEST_UTTERANCES = 8251  # iden_split.txt, split 3
SPLIT_CODES = {"1": "train", "2": "dev", "3": "test"}


# The published layout, from huggingface/datasets' datasets/superb/superb.py before the scripts moved to the hub
# (commit d7dfbc83), config "si": file, audio, label = ClassLabel(id10001 .. id11251); splits train/validation/test
# from s3prl's downstream/voxceleb1/veri_test_class.txt (split codes 1/2/3).
HF_FIELDS = {"label": Field(("label", "speaker_id", "speaker")), "text": Field(("text",), required=False)}
HF_SPLITS = {"train": ("train",), "dev": ("validation", "dev"), "test": ("test",)}


@dataclass(frozen=True)
class SIDOptions:
    projector_dim: int = 256
    train_crop_s: float | None = 8.0  # random training crops (SUPERB: 8 s); null = whole utterances
    # default: <data root>/iden_split.txt
    split_file: str | None = path_option(metadata={"protocol": "neutral"})
    # Hugging Face datasets: field -> column and split -> dataset split(s), for names other than the published ones
    columns: dict[str, str] = field(default_factory=dict, metadata={"protocol": "neutral"})
    splits: dict[str, str] = field(default_factory=dict, metadata={"protocol": "neutral"})


def read_iden_split(path: Path) -> list[tuple[str, str]]:
    """``iden_split.txt`` -> [(split, "<speaker>/<video>/<utt>.wav")]; malformed lines are one-line errors."""
    entries = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in SPLIT_CODES or len(Path(parts[1]).parts) != 3:
            raise DataError(f"{path}:{line_no}: expected '<1|2|3> <speaker>/<video>/<utt>.wav', "
                            f"found {line.strip()[:80]!r}")
        entries.append((SPLIT_CODES[parts[0]], parts[1]))
    if not entries:
        raise DataError(f"{path}: empty; expected the official VoxCeleb1 identification split")
    return entries


def prepare_real(root: Path, split_file: Path | None = None) -> dict[str, list[Utterance]]:
    """Manifests for the real VoxCeleb1 identification layout (see the module docstring); paths relative to
    ``<root>/wav``."""
    expect_path(root, "the corpus folder", REAL_CORPUS)
    split_file = expect_path(split_file or root / "iden_split.txt",
                             "the identification split iden_split.txt (or set task_options.split_file)", REAL_CORPUS)
    wav_dir = expect_path(root / "wav", "the wav/ folder (wav/<speaker>/<video>/<utt>.wav)", REAL_CORPUS)
    entries = read_iden_split(split_file)
    missing = [rel for _, rel in entries if not (wav_dir / rel).is_file()]
    if missing:
        first = wav_dir / missing[0]
        note = f"listed in {split_file.name} ({len(missing)} of {len(entries)} listed files missing)"
        for level, what in ((first.parent.parent, "the speaker folder"), (first.parent, "the video folder"),
                            (first, "the wav file")):
            expect_path(level, f"{what} {note}", REAL_CORPUS)
    splits: dict[str, list[Utterance]] = {"train": [], "dev": [], "test": []}
    for split, rel in entries:
        speaker = Path(rel).parts[0]
        duration = audio_duration_s(wav_dir / rel, split_file)
        splits[split].append(Utterance(str(Path(rel).with_suffix("")), rel, duration, speaker, split,
                                       {"label": speaker}))
    for code, split in SPLIT_CODES.items():
        if not splits[split]:
            raise DataError(f"{split_file}: no {split} lines (split code {code}) in the {REAL_CORPUS} split file")
    return splits


def _with_speaker_label(utts: Sequence[Utterance]) -> list[Utterance]:
    return [Utterance(u.id, u.path, u.duration_s, u.speaker, u.split, {**u.labels, "label": u.speaker}) for u in utts]


def prepare(data_cfg: Any, options: SIDOptions) -> PreparedData:
    if data_cfg.corpus == "synth":
        from speechbench.downstreams.synth.corpus import ensure_corpus

        corpus_dir = ensure_corpus(data_cfg.profile, data_cfg.synth_seed)
        splits = {s: _with_speaker_label(read_manifest(corpus_dir / "sid" / f"{s}.jsonl"))
                  for s in ("train", "dev", "test")}
        return PreparedData(corpus_dir, splits, "synth", classes(splits["train"]),
                            {"profile": data_cfg.profile, "root": str(corpus_dir)})
    if hf_location(data_cfg.root) is not None:
        rows = read_task_rows(data_cfg.root, HF_FIELDS, HF_SPLITS, options, id_components=3)
        splits = {s: [dataclasses.replace(u, speaker=str(u.labels["label"]), labels={**u.labels, "label":
                                                                                      str(u.labels["label"])})
                      for u in utts] for s, utts in rows.splits.items()}
        return PreparedData(rows.dataset.audio_root, splits, rows.corpus, classes(splits["train"]), rows.info())
    if not data_cfg.root:
        raise DataError(f"SID on the real corpus needs --data-root pointing at the {REAL_CORPUS} folder "
                        "(wav/ and iden_split.txt)")
    root = Path(data_cfg.root)
    split_file = Path(options.split_file) if options.split_file else root / "iden_split.txt"
    splits = prepare_real(root, split_file)
    return PreparedData(root / "wav", splits, REAL_CORPUS, classes(splits["train"]),
                        {"root": str(root), "split_file": str(split_file)})


def classes(train: Sequence[Utterance]) -> tuple[str, ...]:
    """One class per training speaker, sorted."""
    return tuple(sorted({u.labels["label"] for u in train}))


def train_crop_s(options: SIDOptions) -> float | None:
    return options.train_crop_s if options.train_crop_s else None


def targets(utterances: Sequence[Utterance], prepared: PreparedData) -> torch.Tensor:
    index = {c: i for i, c in enumerate(prepared.label_space)}
    return torch.tensor([index[u.labels["label"]] for u in utterances], dtype=torch.long)


def build_head(input_dim: int, prepared: PreparedData, options: SIDOptions) -> torch.nn.Module:
    return SpeakerHead(input_dim, options.projector_dim, prepared.label_space)


@dataclass(frozen=True)
class SpeakerLogits:
    """The SID head's output: logits and the speaker name of each class."""

    logits: torch.Tensor  # [B, speakers]
    speakers: tuple[str, ...]


class SpeakerHead(UtteranceLevelHead):
    """The utterance-level head whose output carries the speaker names (so predictions are names)."""

    def __init__(self, input_dim: int, projector_dim: int, speakers: Sequence[str]):
        super().__init__(input_dim, projector_dim, len(speakers))
        self.speakers = tuple(speakers)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> SpeakerLogits:
        return SpeakerLogits(super().forward(x, lengths), self.speakers)


def loss(output: SpeakerLogits, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits, target)


def predict(output: SpeakerLogits, lengths: torch.Tensor | None = None) -> list[str]:
    return [output.speakers[i] for i in output.logits.argmax(dim=-1).tolist()]


def references(utterances: Sequence[Utterance], prepared: PreparedData) -> list[str]:
    return [u.labels["label"] for u in utterances]


def score(predictions: list, refs: list) -> dict:
    return {"accuracy": accuracy_percent(predictions, refs)}


def protocol(prepared: PreparedData, options: SIDOptions) -> tuple[dict, list[str]]:
    """Facts: the training crop and, on the real corpus, the official test size."""
    facts: dict = {"train_crop_s": options.train_crop_s}
    if prepared.corpus != "synth":
        facts["test_official"] = OFFICIAL_TEST_UTTERANCES
    return facts, []


TASK = register_task(Task(
    name="sid", metric="accuracy", unit="%", higher_is_better=True, granularity="pooled",
    options_cls=SIDOptions, prepare=prepare, targets=targets, build_head=build_head, loss=loss,
    predict=predict, references=references, score=score,
    summary="speaker identification (closed set, one class per training speaker), accuracy",
    real_corpus=REAL_CORPUS, train_crop_s=train_crop_s, protocol=protocol, item_scores=correct_items,
))
