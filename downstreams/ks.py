"""KS: keyword spotting, Speech Commands v0.01 protocol (12 classes, accuracy).

Real corpus: ``--data-root`` is ``speech_commands_v0.01/`` (one folder per word, ``_background_noise_/``,
``validation_list.txt``, ``testing_list.txt``); the official test set ``speech_commands_test_set_v0.01/`` is
found beside it (or at ``task_options.test_root``). Train = every word file in neither list, dev = the
validation list, test = the official test set (its own ``_unknown_`` and ``_silence_`` folders). Words outside
the ten targets become ``_unknown_``; ``_silence_`` for train/dev is the background-noise files cut into
consecutive 1 s crops, each crop assigned to dev when a hash of its name falls in the lowest 10 %.

Sampling (``task_options.sampling``): ``class_balanced`` (SUPERB, s3prl's ``WeightedRandomSampler`` with weights
``len(split) / count(class)``) draws training batches with replacement so that each of the 12 classes is 1/12 of the
draws, and selects the checkpoint on the accuracy of a class-balanced resample of the dev set drawn afresh at every
evaluation (seeded by the run's seed and the step, so it is reproducible); ``uniform`` visits every training
utterance once per epoch and scores the whole dev set (on the real corpus about 63 % of the training clips are
``_unknown_`` and under 1 % ``_silence_``, which then shifts the head's prior).

Real-corpus audio is scaled by ``task_options.gain_db`` (-3 dB: s3prl loads Speech Commands through sox with
``gain -3.0``); the test set is the official 3,081 clips.

Synthetic corpus: ``ks/{train,dev,test}.jsonl`` of the generated corpus, same labels (no gain).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
import torch
import torch.nn.functional as F

from speechbench.common import path_option
from speechbench.downstreams.data import DataError, Utterance, expect_path, read_manifest, with_gain
from speechbench.downstreams.heads import UtteranceLevelHead
from speechbench.downstreams.metrics import accuracy_percent
from speechbench.downstreams.tasks import PreparedData, Task, correct_items, register_task

WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
CLASSES = WORDS + ("_unknown_", "_silence_")
BACKGROUND = "_background_noise_"
REAL_CORPUS = "speech_commands_v0.01"
OFFICIAL_TEST_CLIPS = 3081  # speech_commands_test_set_v0.01
SAMPLINGS = ("class_balanced", "uniform")
S3PRL_GAIN_DB = -3.0


@dataclass(frozen=True)
class KSOptions:
    projector_dim: int = 256
    # the official test set; default: speech_commands_test_set_v0.01 beside the data root
    test_root: str | None = path_option(metadata={"protocol": "neutral"})
    # class_balanced (SUPERB) | uniform; see the module docstring
    sampling: str = field(default="class_balanced", metadata={"protocol": "task"})
    # applied to real-corpus audio (s3prl: sox gain -3.0)
    gain_db: float = field(default=S3PRL_GAIN_DB, metadata={"protocol": "task"})


def _synth_splits(corpus_dir: Path) -> dict[str, list[Utterance]]:
    return {split: read_manifest(corpus_dir / "ks" / f"{split}.jsonl") for split in ("train", "dev", "test")}


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _wav_utterance(root: Path, rel: str, split: str, keyword: str) -> Utterance:
    info = sf.info(str(root / rel))
    speaker = Path(rel).name.split("_nohash_")[0]
    return Utterance(f"{split}/{rel}", rel, info.frames / info.samplerate, speaker, split, {"keyword": keyword})


def _silence_crops(root: Path) -> dict[str, list[Utterance]]:
    crops: dict[str, list[Utterance]] = {"train": [], "dev": []}
    for wav in sorted((root / BACKGROUND).glob("*.wav")):
        info = sf.info(str(wav))
        for k in range(int(info.frames // info.samplerate)):
            name = f"{wav.name}#{k}"
            split = "dev" if int(hashlib.sha1(name.encode()).hexdigest(), 16) % 10 == 0 else "train"
            rel = f"{BACKGROUND}/{wav.name}"
            crops[split].append(Utterance(f"{split}/{name}", rel, 1.0, "noise", split,
                                          {"keyword": "_silence_", "offset_s": float(k)}))
    return crops


def prepare_real(root: Path, test_root: Path | None) -> dict[str, list[Utterance]]:
    """Manifests for the real Speech Commands v0.01 layout (see the module docstring)."""
    layout = REAL_CORPUS
    expect_path(root, "the corpus folder", layout)
    val_list = _read_list(expect_path(root / "validation_list.txt", "validation_list.txt", layout))
    test_list = _read_list(expect_path(root / "testing_list.txt", "testing_list.txt", layout))
    expect_path(root / BACKGROUND, f"the {BACKGROUND}/ folder", layout)
    for word in WORDS:
        expect_path(root / word, f"the word folder {word}/", layout)
    # test paths are stored absolute (the manifest's other paths are relative to ``root``)
    test_root = (test_root or root.parent / "speech_commands_test_set_v0.01").absolute()
    expect_path(test_root, "the official test set folder (set task_options.test_root)",
                "speech_commands_test_set_v0.01")
    splits: dict[str, list[Utterance]] = {"train": [], "dev": [], "test": []}
    for word_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name != BACKGROUND):
        keyword = word_dir.name if word_dir.name in WORDS else "_unknown_"
        for wav in sorted(word_dir.glob("*.wav")):
            rel = f"{word_dir.name}/{wav.name}"
            if rel in test_list:
                continue
            split = "dev" if rel in val_list else "train"
            splits[split].append(_wav_utterance(root, rel, split, keyword))
    for split, crops in _silence_crops(root).items():
        splits[split].extend(crops)
    for label in CLASSES:
        folder = expect_path(test_root / label, f"the test folder {label}/", "speech_commands_test_set_v0.01")
        for wav in sorted(folder.glob("*.wav")):
            utt = _wav_utterance(test_root, f"{label}/{wav.name}", "test", label)
            splits["test"].append(Utterance(utt.id, str(test_root / utt.path), utt.duration_s, utt.speaker,
                                            "test", utt.labels))
    for split, utts in splits.items():
        if not utts:
            raise DataError(f"{root}: no {split} utterances found in the {layout} layout")
    return splits


def prepare(data_cfg, options: KSOptions) -> PreparedData:
    if options.sampling not in SAMPLINGS:
        raise DataError(f"task_options.sampling must be one of {', '.join(SAMPLINGS)}, got {options.sampling!r}")
    if data_cfg.corpus == "synth":
        from speechbench.downstreams.synth.corpus import ensure_corpus

        corpus_dir = ensure_corpus(data_cfg.profile, data_cfg.synth_seed)
        return PreparedData(corpus_dir, _synth_splits(corpus_dir), "synth", CLASSES,
                            {"profile": data_cfg.profile, "root": str(corpus_dir)})
    if not data_cfg.root:
        raise DataError(f"KS on the real corpus needs --data-root pointing at {REAL_CORPUS}/")
    root = Path(data_cfg.root)
    test_root = Path(options.test_root) if options.test_root else root.parent / "speech_commands_test_set_v0.01"
    splits = {split: with_gain(utts, options.gain_db) for split, utts in prepare_real(root, test_root).items()}
    return PreparedData(root, splits, REAL_CORPUS, CLASSES,
                        {"root": str(root), "test_root": str(test_root), "gain_db": options.gain_db})


def sample_weights(utterances: Sequence[Utterance], prepared: PreparedData, options: KSOptions) -> list[float] | None:
    """``class_balanced``: ``len(utterances) / count(class)`` per utterance (s3prl's weights); ``uniform``: None."""
    if options.sampling != "class_balanced":
        return None
    counts = Counter(u.labels["keyword"] for u in utterances)
    return [len(utterances) / counts[u.labels["keyword"]] for u in utterances]


def protocol(prepared: PreparedData, options: KSOptions) -> tuple[dict, list[str]]:
    """Facts: the sampling and the official test size; deviations: uniform sampling, another gain."""
    deviations = []
    if options.sampling != "class_balanced":
        deviations.append("uniform sampling of training batches and dev selection on the whole dev set (SUPERB: "
                          "class-balanced draws); shifts the head's prior towards _unknown_ and the selected step")
    facts = {"sampling": options.sampling,
             "dev_selection": "accuracy on a class-balanced resample of dev (with replacement, drawn from the seed and "
                              "step at every evaluation, as s3prl's weighted dev loader)"
             if options.sampling == "class_balanced" else "accuracy on the whole dev set"}
    if prepared.corpus != "synth":
        facts.update(test_official=OFFICIAL_TEST_CLIPS, gain_db=options.gain_db)
        if options.gain_db != S3PRL_GAIN_DB:
            deviations.append(f"audio gain {options.gain_db:g} dB (s3prl: {S3PRL_GAIN_DB:g} dB); changes the input "
                              "level of upstreams that are not scale-invariant")
    return facts, deviations


def targets(utterances: Sequence[Utterance], prepared: PreparedData) -> torch.Tensor:
    index = {c: i for i, c in enumerate(prepared.label_space)}
    return torch.tensor([index[u.labels["keyword"]] for u in utterances], dtype=torch.long)


def build_head(input_dim: int, prepared: PreparedData, options: KSOptions) -> torch.nn.Module:
    return UtteranceLevelHead(input_dim, options.projector_dim, len(prepared.label_space))


def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def make_predict(classes: Sequence[str]):
    def predict(logits: torch.Tensor, lengths: torch.Tensor | None = None) -> list[str]:
        return [classes[i] for i in logits.argmax(dim=-1).tolist()]

    return predict


def references(utterances: Sequence[Utterance], prepared: PreparedData) -> list[str]:
    return [u.labels["keyword"] for u in utterances]


def score(predictions: list, refs: list) -> dict:
    return {"accuracy": accuracy_percent(predictions, refs)}


TASK = register_task(Task(
    name="ks", metric="accuracy", unit="%", higher_is_better=True, granularity="pooled",
    options_cls=KSOptions, prepare=prepare, targets=targets, build_head=build_head, loss=loss,
    predict=make_predict(CLASSES), references=references, score=score,
    summary="keyword spotting, 12 classes (10 words, _unknown_, _silence_), accuracy",
    real_corpus=REAL_CORPUS, sample_weights=sample_weights, protocol=protocol, item_scores=correct_items,
))
