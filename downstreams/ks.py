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

Hugging Face dataset (``--data-root hf:...``, :mod:`downstreams.hf_data`): the published columns of ``superb`` (config
``ks``) and ``google/speech_commands`` (``v0.01``): ``audio``, ``label`` (a ClassLabel or a string: the ten words stay,
``_silence_`` stays, every other word -- speech_commands' 20 auxiliary words, superb's ``_unknown_`` -- becomes
``_unknown_``), optionally ``speaker_id``, ``id`` and ``file``; splits ``train``, ``validation`` (dev), ``test``.
``_silence_`` rows of 2 s or more are background-noise recordings: they are cut into consecutive 1 s crops, as above.
When the dataset's dev split has no ``_silence_`` row (``superb`` puts all six noise files into ``train``), the crops
of the train split are divided between train and dev by the hash rule above, which reproduces the native layout;
otherwise (``google/speech_commands`` splits the noise files itself) the crops stay in their split, and the result
records that as a deviation.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
import torch
import torch.nn.functional as F

from speechbench.common import hf_location, path_option
from speechbench.downstreams.data import DataError, Utterance, expect_path, read_manifest, with_gain
from speechbench.downstreams.heads import UtteranceLevelHead
from speechbench.downstreams.hf_data import Field, TaskRows, read_task_rows
from speechbench.downstreams.metrics import accuracy_percent
from speechbench.downstreams.tasks import PreparedData, Task, correct_items, register_task

WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
CLASSES = WORDS + ("_unknown_", "_silence_")
BACKGROUND = "_background_noise_"
REAL_CORPUS = "speech_commands_v0.01"
OFFICIAL_TEST_CLIPS = 3081  # speech_commands_test_set_v0.01
SAMPLINGS = ("class_balanced", "uniform")
S3PRL_GAIN_DB = -3.0


# The published layouts, from the datasets' loading scripts (huggingface/datasets before the scripts moved to the hub,
# commit d7dfbc83: datasets/superb/superb.py, config "ks": file, audio, label = ClassLabel(yes, no, up, down, left,
# right, on, off, stop, go, _silence_, _unknown_), splits train/validation/test, the six _background_noise_ files in
# train as _silence_; datasets/speech_commands/speech_commands.py, config "v0.01": file, audio, label = ClassLabel(the
# 30 words + _silence_), is_unknown, speaker_id, utterance_id (a per-speaker counter, not an id), splits
# train/validation/test, _silence_ clips in train and validation longer than 1 s).
HF_FIELDS = {"keyword": Field(("label",)), "speaker": Field(("speaker_id",), required=False)}
HF_SPLITS = {"train": ("train",), "dev": ("validation", "dev", "valid"), "test": ("test",)}
LONG_SILENCE_S = 2.0  # a _silence_ row at least this long is a noise recording, cut into 1 s crops


@dataclass(frozen=True)
class KSOptions:
    projector_dim: int = 256
    # the official test set; default: speech_commands_test_set_v0.01 beside the data root
    test_root: str | None = path_option(metadata={"protocol": "neutral"})
    # class_balanced (SUPERB) | uniform; see the module docstring
    sampling: str = field(default="class_balanced", metadata={"protocol": "task"})
    # applied to real-corpus audio (s3prl: sox gain -3.0)
    gain_db: float = field(default=S3PRL_GAIN_DB, metadata={"protocol": "task"})
    # Hugging Face datasets: field -> column and split -> dataset split(s), for names other than the published ones
    columns: dict[str, str] = field(default_factory=dict, metadata={"protocol": "neutral"})
    splits: dict[str, str] = field(default_factory=dict, metadata={"protocol": "neutral"})


def _synth_splits(corpus_dir: Path) -> dict[str, list[Utterance]]:
    return {split: read_manifest(corpus_dir / "ks" / f"{split}.jsonl") for split in ("train", "dev", "test")}


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _wav_utterance(root: Path, rel: str, split: str, keyword: str) -> Utterance:
    info = sf.info(str(root / rel))
    speaker = Path(rel).name.split("_nohash_")[0]
    return Utterance(f"{split}/{rel}", rel, info.frames / info.samplerate, speaker, split, {"keyword": keyword})


def _crop_split(name: str) -> str:
    """The native layout's assignment of a 1 s silence crop ``<file>.wav#<k>``: 10 % of crops to dev, by hash."""
    return "dev" if int(hashlib.sha1(name.encode()).hexdigest(), 16) % 10 == 0 else "train"


def _silence_crops(root: Path) -> dict[str, list[Utterance]]:
    crops: dict[str, list[Utterance]] = {"train": [], "dev": []}
    for wav in sorted((root / BACKGROUND).glob("*.wav")):
        info = sf.info(str(wav))
        for k in range(int(info.frames // info.samplerate)):
            name = f"{wav.name}#{k}"
            split = _crop_split(name)
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


def _keyword(label: object) -> str:
    return label if label in WORDS or label == "_silence_" else "_unknown_"


def prepare_hf(root: str, options: KSOptions) -> tuple[dict[str, list[Utterance]], TaskRows]:
    """The three splits of a Hugging Face dataset (module docstring): 12-class keywords, long silence cut into crops."""
    rows = read_task_rows(root, HF_FIELDS, HF_SPLITS, options, id_components=2,
                          speaker_of=lambda uid: Path(uid).name.split("_nohash_")[0])
    splits = {s: [dataclasses.replace(u, labels={**u.labels, "keyword": _keyword(u.labels["keyword"])}) for u in utts]
              for s, utts in rows.splits.items()}
    if not any(u.labels["keyword"] in WORDS for u in splits["train"]):
        raise rows.dataset.fail(f"no train row is labelled with one of the ten keywords ({', '.join(WORDS)}); is "
                                f"{rows.record['columns']['keyword']!r} the keyword column? (task_options.columns."
                                "keyword=<column>)")
    long = {s: [u for u in utts if u.labels["keyword"] == "_silence_" and u.duration_s >= LONG_SILENCE_S]
            for s, utts in splits.items()}
    if not any(long.values()):
        return splits, rows
    rehash = not any(u.labels["keyword"] == "_silence_" for u in splits["dev"]) and bool(long["train"])
    crops: dict[str, list[Utterance]] = {s: [] for s in splits}
    for split, utts in long.items():
        for u in utts:
            for k in range(int(u.duration_s)):
                target = _crop_split(f"{Path(u.id).name}.wav#{k}") if rehash and split == "train" else split
                crops[target].append(Utterance(f"{u.id}#{k}", u.path, 1.0, "noise", target,
                                               {"keyword": "_silence_", "offset_s": float(k)}))
    cut = {id(u) for utts in long.values() for u in utts}
    splits = {s: [u for u in utts if id(u) not in cut] + crops[s] for s, utts in splits.items()}
    counts = ", ".join(f"{len(long[s])} in {s}" for s in splits if long[s])
    if rehash:
        rows.record["notes"].append(f"_silence_: the long noise recordings ({counts}) are cut into 1 s crops, 10 % "
                                    "of them moved to dev by the native layout's hash rule (the dataset's dev split "
                                    "has no _silence_)")
    else:
        rows.record["deviations"].append(f"_silence_: the dataset's own division of the noise recordings ({counts}) "
                                         "into 1 s crops within their split; the native layout sends a hashed 10 % of "
                                         "all crops to dev")
    return splits, rows


def prepare(data_cfg, options: KSOptions) -> PreparedData:
    if options.sampling not in SAMPLINGS:
        raise DataError(f"task_options.sampling must be one of {', '.join(SAMPLINGS)}, got {options.sampling!r}")
    if data_cfg.corpus != "synth" and hf_location(data_cfg.root) is not None:
        splits, rows = prepare_hf(data_cfg.root, options)
        gain = 0.0 if rows.corpus == "synth" else options.gain_db  # the synthetic corpus has no gain
        splits = {split: with_gain(utts, gain) for split, utts in splits.items()}
        return PreparedData(rows.dataset.audio_root, splits, rows.corpus, CLASSES, rows.info(gain_db=gain))
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
