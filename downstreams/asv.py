"""ASV: speaker verification, VoxCeleb1 protocol (x-vector head, AM-softmax, cosine scoring, EER).

Real corpus: ``--data-root`` is the VoxCeleb1 folder holding ``wav/<speaker>/<video>/<utt>.wav`` and the official
test trial list ``veri_test.txt`` (37,720 pairs; ``task_options.trial_list`` may name ``veri_test2.txt``, the
cleaned list, or any path), lines ``<1|0> <speaker>/<video>/<utt>.wav <speaker>/<video>/<utt>.wav``.
Test = the utterances of the trial list. Development speakers = every speaker folder that occurs nowhere in the
trial list; of those, ``dev_speakers`` (chosen by a hash of the speaker id, so the choice never depends on the
machine) are held out to build a dev trial list (``dev_trials`` balanced target/nontarget pairs among
``dev_utterances_per_speaker`` utterances per held-out speaker, seeded); the others are the training speakers.

Checkpoint selection (``task_options.checkpoint_selection``): SUPERB had no ASV dev set and reported the best test
EER over the checkpoints at 20k, 40k, ... 200k steps. ``dev_trials`` (the default) chooses the checkpoint by the EER
on the dev trials of held-out speakers, never the test trials. ``superb_test`` reproduces SUPERB: no speaker is held
out (training uses every development speaker, as s3prl), the "dev" set is the test trial list itself, so the reported
EER is the best test EER over the checkpoints taken every ``train.eval_every`` steps (the superb recipe: 20k). The
rule is written into every score dict (``checkpoint_selection``) and the result's protocol facts.

Batches (as s3prl's shuffled DataLoader): a fresh random permutation of the training utterances every epoch, cut into
``train.batch_size`` batches, so a batch mixes speakers and changes between epochs.
Audio of the real corpus is scaled by ``task_options.gain_db`` (-3 dB: s3prl's sox ``gain -3.0``).

Crops (s3prl ``sv_voxceleb1``): training utterances shorter than ``min_train_s`` (2 s: s3prl's ``min_sec`` of
32,000 samples) are dropped, longer ones are cut to random ``max_crop_s`` windows (8 s: ``max_timestep`` 128,000
samples); evaluation sees whole utterances. s3prl measures the 2 s after sox VAD trimming; we measure untrimmed
audio. Utterances shorter than the x-vector context (15 frames) are padded by repetition inside the head.

Head (s3prl XVector + SP + UtteranceExtractor): Linear(D, 512) -> TDNN(512, 512, context 5, dilation 1)
-> TDNN(3, 2) -> TDNN(3, 3) -> TDNN(1, 1) -> TDNN(512, 1500, 1, 1) -> mean + std pooling over valid frames
-> Linear(3000, 512) + ReLU = the embedding -> Linear(512, 512) + ReLU -> AM-softmax (s = 30, m = 0.4) over the
training speakers. Scoring: cosine of length-normalised embeddings; EER from the ROC curve and minDCF
(p_target 0.01, c_miss = c_fa = 1). Test trial scores are written to ``scores.txt`` for audit.

Synthetic corpus: ``asv/train.jsonl`` (development speakers), ``asv/{dev,test}.jsonl`` with the corpus' balanced
trial lists ``asv/{dev,test}_trials.txt`` (``label enroll_id test_id``, look-alike speaker pairs among the
nontargets); dev and test speakers are disjoint from each other and from training.

Hugging Face dataset (``--data-root hf:...``, :mod:`downstreams.hf_data`): splits ``train`` (the development
speakers) and ``test`` (the trial utterances), columns ``audio`` and a speaker column (``speaker_id``, ``speaker`` or
``label``), with an ``id`` column or ``file`` paths ``<speaker>/<video>/<utt>.wav`` whose ids (``<speaker>/<video>/
<utt>``) the trial list ``task_options.trial_list`` names (relative to the dataset's folder). Dev speakers are held out
of the train split as above. The synthetic corpus' export uses its own validation split and trial lists.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from speechbench.common import atomic_write_text, hf_location, path_option, sha256_file
from speechbench.downstreams.data import (
    DataError,
    Utterance,
    audio_duration_s,
    expect_path,
    read_manifest,
    with_gain,
)
from speechbench.downstreams.hf_data import Field, TaskRows, open_dataset, read_task_rows
from speechbench.downstreams.metrics import equal_error_rate_percent, min_dcf
from speechbench.downstreams.tasks import PreparedData, Task, register_task

REAL_CORPUS = "VoxCeleb1"
SELECTION_RULE = "best dev EER on trials between held-out training-set speakers (never the test trials)"
SUPERB_TEST_RULE = ("superb_test: best test EER over the checkpoints taken every train.eval_every steps (SUPERB's "
                    "rule; optimistic, the test trials choose the checkpoint)")
SELECTIONS = ("dev_trials", "superb_test")
INITS = ("default", "he")
OFFICIAL_TRIALS = 37720  # veri_test.txt (s3prl: voxceleb1_test_v2.txt, the same 37,720 pairs)
S3PRL_GAIN_DB = -3.0
XVECTOR_CONTEXT = 14  # frames lost by the TDNN stack: (5-1)*1 + (3-1)*2 + (3-1)*3


# No VoxCeleb verification dataset shipped with huggingface/datasets' loading scripts; the columns follow the other
# speaker datasets (superb si: file, audio, label; LibriSpeech: speaker_id) and file paths <speaker>/<video>/<utt>.wav,
# whose ids the trial list names. The synthetic corpus' export also has a validation split and its trial lists.
HF_FIELDS = {"speaker": Field(("speaker_id", "speaker", "label")), "text": Field(("text",), required=False)}
HF_SPLITS = {"train": ("train",), "dev": ("validation", "dev"), "test": ("test",)}


@dataclass(frozen=True)
class ASVOptions:
    input_dim: int = 512  # Linear(D, input_dim) connector and the TDNN width
    agg_dim: int = 1500  # last TDNN layer, pooled to mean + std (2 * agg_dim)
    embedding_dim: int = 512
    batch_norm: bool = False  # after each TDNN ReLU (s3prl: off)
    am_scale: float = 30.0
    am_margin: float = 0.4
    max_crop_s: float | None = 8.0  # random training crops; null = whole utterances
    min_train_s: float = 2.0  # training utterances shorter than this are dropped
    # relative to the data root, or a path; the protocol facts record its name and size
    trial_list: str = path_option("veri_test.txt", relative_to="data_root", metadata={"protocol": "task"})
    dev_speakers: int = 40  # held-out development speakers for the dev trial list (real corpus, dev_trials only)
    dev_utterances_per_speaker: int = 20
    dev_trials: int = 10000
    split_seed: int = 0  # seeds the dev utterance and trial draw (real corpus)
    # dev_trials (default) | superb_test (module docstring)
    checkpoint_selection: str = field(default="dev_trials", metadata={"protocol": "task"})
    # default: PyTorch's initialisation (s3prl) | he: He-normal TDNN and segment layers, zero biases
    init: str = field(default="default", metadata={"protocol": "task"})
    gain_db: float = field(default=S3PRL_GAIN_DB, metadata={"protocol": "task"})  # real-corpus audio
    # Hugging Face datasets: field -> column and split -> dataset split(s), for names other than the published ones
    columns: dict[str, str] = field(default_factory=dict, metadata={"protocol": "neutral"})
    splits: dict[str, str] = field(default_factory=dict, metadata={"protocol": "neutral"})


@dataclass(frozen=True)
class ASVData:
    """The ASV label space: training speakers (AM-softmax classes) and the trial lists of dev and test."""

    speakers: tuple[str, ...]
    trials: dict  # split -> list of (label, enroll_id, test_id)
    selection_rule: str = SELECTION_RULE


@dataclass(frozen=True)
class TrialList:
    """Trials over one split's utterances: ``labels [N]`` (1 target, 0 nontarget) and the positions of the enrolment
    and test utterances in that split (``enroll [N]``, ``test [N]``), plus the ids for audit files."""

    name: str
    labels: np.ndarray
    enroll: np.ndarray
    test: np.ndarray
    pairs: tuple[tuple[int, str, str], ...]
    selection_rule: str = SELECTION_RULE

    def __len__(self) -> int:
        return len(self.pairs)


# ---------------------------------------------------------------------------------------------- data preparation

def read_trials(path: Path, strip_suffix: bool = False) -> list[tuple[int, str, str]]:
    """``label enroll test`` lines -> [(label, enroll, test)]; ids lose their ``.wav`` with ``strip_suffix``."""
    trials = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("0", "1"):
            raise DataError(f"{path}:{line_no}: expected '<1|0> <enroll> <test>', found {line.strip()[:80]!r}")
        a, b = parts[1:]
        if strip_suffix:
            a, b = (str(Path(x).with_suffix("")) for x in (a, b))
        trials.append((int(parts[0]), a, b))
    if not trials:
        raise DataError(f"{path}: no trials")
    if len({t[0] for t in trials}) < 2:
        raise DataError(f"{path}: needs both target (1) and nontarget (0) trials")
    return trials


def _hash(text: str) -> int:
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)


def build_trials(by_speaker: dict[str, list[str]], n: int, rng: np.random.Generator) -> list[tuple[int, str, str]]:
    """About ``n`` distinct trials, half target (same speaker), half nontarget (two different speakers)."""
    same = [(1, a, b) for s in sorted(by_speaker) for i, a in enumerate(by_speaker[s]) for b in by_speaker[s][i + 1:]]
    n_target = min(n // 2, len(same))
    chosen = [same[i] for i in sorted(rng.choice(len(same), n_target, replace=False))] if n_target else []
    utts = [(s, u) for s in sorted(by_speaker) for u in by_speaker[s]]
    n_speakers = len(by_speaker)
    max_nontarget = (len(utts) ** 2 - sum(len(v) ** 2 for v in by_speaker.values())) // 2
    want = min(n - n_target, max_nontarget)
    seen: set[tuple[str, str]] = set()
    nontargets = []
    while len(nontargets) < want and n_speakers > 1:
        for i, j in rng.integers(0, len(utts), (2 * want, 2)):
            (sa, a), (sb, b) = utts[i], utts[j]
            key = (min(a, b), max(a, b))
            if sa != sb and key not in seen:
                seen.add(key)
                nontargets.append((0, a, b))
                if len(nontargets) == want:
                    break
    trials = chosen + nontargets
    return [trials[i] for i in rng.permutation(len(trials))]


def prepare_real(root: Path, options: ASVOptions) -> tuple[dict[str, list[Utterance]], dict, dict]:
    """VoxCeleb1 -> (splits, trial lists, info); utterance paths relative to ``<root>/wav`` (module docstring)."""
    expect_path(root, "the corpus folder", REAL_CORPUS)
    trial_path = Path(options.trial_list)
    trial_path = expect_path(trial_path if trial_path.is_absolute() else root / trial_path,
                             "the verification trial list (veri_test.txt or veri_test2.txt; task_options.trial_list)",
                             REAL_CORPUS)
    wav_dir = expect_path(root / "wav", "the wav/ folder (wav/<speaker>/<video>/<utt>.wav)", REAL_CORPUS)
    test_trials = read_trials(trial_path, strip_suffix=True)
    test_ids = sorted({x for _, a, b in test_trials for x in (a, b)})
    bad = [i for i in test_ids if len(Path(i).parts) != 3]
    if bad:
        raise DataError(f"{trial_path}: trial entries must read <speaker>/<video>/<utt>.wav, found {bad[0]!r}")
    missing = [i for i in test_ids if not (wav_dir / f"{i}.wav").is_file()]
    if missing:
        first = wav_dir / f"{missing[0]}.wav"
        note = f"listed in {trial_path.name} ({len(missing)} of {len(test_ids)} listed files missing)"
        for level, what in ((first.parent.parent, "the speaker folder"), (first.parent, "the video folder"),
                            (first, "the wav file")):
            expect_path(level, f"{what} {note}", REAL_CORPUS)
    test_speakers = {Path(i).parts[0] for i in test_ids}
    dev_pool = sorted(p.name for p in wav_dir.iterdir() if p.is_dir() and p.name not in test_speakers)
    development = {}
    for speaker in dev_pool:
        rels = sorted(str(p.relative_to(wav_dir)) for p in (wav_dir / speaker).glob("*/*.wav"))
        development[speaker] = [Utterance(str(Path(rel).with_suffix("")), rel, audio_duration_s(wav_dir / rel),
                                          speaker, "train", {"label": speaker}) for rel in rels]
    splits, dev_trials, too_short = split_development(development, options, f"{wav_dir}",
                                                      f"speaker folders (not in {trial_path.name})")
    for uid in test_ids:
        rel = f"{uid}.wav"
        splits["test"].append(Utterance(uid, rel, audio_duration_s(wav_dir / rel, trial_path), Path(uid).parts[0],
                                        "test", {"label": Path(uid).parts[0]}))
    info = {"root": str(root), "trial_list": str(trial_path), "trial_list_sha256": sha256_file(trial_path),
            "test_trials": len(test_trials),
            "dev_trials": len(dev_trials), "dev_speakers": sorted({u.speaker for u in splits["dev"]}),
            "train_speakers": len({u.speaker for u in splits["train"]}), "train_dropped_short": too_short}
    return splits, {"dev": dev_trials, "test": test_trials}, info


def split_development(development: dict[str, list[Utterance]], options: ASVOptions, where: str, what: str,
                      key=lambda u: u.path) -> tuple[dict[str, list[Utterance]], list, int]:
    """Training and dev utterances from the development speakers (``speaker -> utterances``, each list sorted by
    ``key``): with ``dev_trials`` selection, ``dev_speakers`` speakers (by a hash of their name) are held out, each
    with ``dev_utterances_per_speaker`` utterances (by a hash of ``key``), and a seeded dev trial list is built
    among them; every other speaker's utterances of at least ``min_train_s`` train. Returns the splits (test
    empty), the dev trials and the number of training utterances dropped as too short."""
    pool = sorted(development)
    if options.checkpoint_selection == "dev_trials" and len(pool) < options.dev_speakers + 2:
        raise DataError(f"{where}: {len(pool)} development {what}; need more than task_options.dev_speakers = "
                        f"{options.dev_speakers}")
    n_held_out = options.dev_speakers if options.checkpoint_selection == "dev_trials" else 0
    held_out = set(sorted(pool, key=_hash)[:n_held_out])
    rng = np.random.default_rng(options.split_seed)
    splits: dict[str, list[Utterance]] = {"train": [], "dev": [], "test": []}
    dev_by_speaker: dict[str, list[str]] = {}
    too_short = 0
    for speaker in pool:
        utts = development[speaker]
        if speaker in held_out:
            utts = sorted(utts, key=lambda u: _hash(key(u)))[: options.dev_utterances_per_speaker]
            if len(utts) < 2:
                continue
            dev_by_speaker[speaker] = [u.id for u in utts]
            splits["dev"] += [dataclasses.replace(u, split="dev") for u in utts]
            continue
        kept = [u for u in utts if u.duration_s >= options.min_train_s]
        too_short += len(utts) - len(kept)
        splits["train"] += [dataclasses.replace(u, split="train") for u in kept]
    dev_trials = build_trials(dev_by_speaker, options.dev_trials, rng) if held_out else []
    if not splits["train"] or (held_out and len({t[0] for t in dev_trials}) < 2):
        raise DataError(f"{where}: not enough development speakers/utterances for training and a dev trial list")
    return splits, dev_trials, too_short


def prepare_hf(root: str, options: ASVOptions) -> tuple[dict[str, list[Utterance]], dict, TaskRows, dict]:
    """A Hugging Face dataset (module docstring) -> (splits, trial lists, the rows read, info)."""
    ds = open_dataset(root)
    if ds.synthetic:  # the synthetic corpus' export: its dev split and trial lists, as the native corpus
        rows = read_task_rows(root, HF_FIELDS, HF_SPLITS, options, dataset=ds)
        if rows.folder is None:
            raise ds.fail("the synthetic corpus' export must be a local folder (it holds the trial lists)")
        trials = {s: read_trials(expect_path(rows.folder / f"{s}_trials.txt", f"the {s} trial list",
                                             "synthetic corpus export")) for s in ("dev", "test")}
        splits = dict(rows.splits)
        splits["train"], too_short = _drop_short(splits["train"], options.min_train_s)
        return splits, trials, rows, rows.info(test_trials=len(trials["test"]), dev_trials=len(trials["dev"]),
                                               train_dropped_short=too_short)
    rows = read_task_rows(root, HF_FIELDS, {s: HF_SPLITS[s] for s in ("train", "test")}, options, id_components=3,
                          dataset=ds)
    labelled = {s: [dataclasses.replace(u, labels={**u.labels, "label": u.speaker}) for u in utts]
                for s, utts in rows.splits.items()}
    trial_path = expect_path(Path(options.trial_list), "the verification trial list (task_options.trial_list)",
                             "trial list '<1|0> <enroll> <test>'")
    test_trials = read_trials(trial_path, strip_suffix=True)
    test_ids = sorted({x for _, a, b in test_trials for x in (a, b)})
    by_id = {u.id: u for u in labelled["test"]}
    missing = [i for i in test_ids if i not in by_id]
    if missing:
        raise ds.fail(f"{len(missing)} of the {len(test_ids)} utterances of {trial_path.name} are not in the test "
                      f"split, e.g. {missing[0]!r} (test ids look like {next(iter(by_id), 'nothing')!r}; an id column "
                      "or file paths <speaker>/<video>/<utt>.wav give matching ids)")
    test_speakers = {by_id[i].speaker for i in test_ids}
    development: dict[str, list[Utterance]] = {}
    for u in labelled["train"]:
        if u.speaker not in test_speakers:
            development.setdefault(u.speaker, []).append(u)
    splits, dev_trials, too_short = split_development(development, options, rows.record["dataset"],
                                                      "speakers in the train split (not in the trial list)",
                                                      key=lambda u: u.id)
    splits["test"] = [by_id[i] for i in test_ids]
    info = rows.info(trial_list=str(trial_path), trial_list_sha256=sha256_file(trial_path),
                     test_trials=len(test_trials), dev_trials=len(dev_trials),
                     dev_speakers=sorted({u.speaker for u in splits["dev"]}),
                     train_speakers=len({u.speaker for u in splits["train"]}), train_dropped_short=too_short)
    return splits, {"dev": dev_trials, "test": test_trials}, rows, info


def _drop_short(utts: Sequence[Utterance], min_s: float) -> tuple[list[Utterance], int]:
    kept = [u for u in utts if u.duration_s >= min_s]
    return kept, len(utts) - len(kept)


def prepare(data_cfg, options: ASVOptions) -> PreparedData:
    for name, value, allowed in (("checkpoint_selection", options.checkpoint_selection, SELECTIONS),
                                 ("init", options.init, INITS)):
        if value not in allowed:
            raise DataError(f"task_options.{name} must be one of {', '.join(allowed)}, got {value!r}")
    if data_cfg.corpus == "synth":
        from speechbench.downstreams.synth.corpus import ensure_corpus

        corpus_dir = ensure_corpus(data_cfg.profile, data_cfg.synth_seed)
        splits = {s: read_manifest(corpus_dir / "asv" / f"{s}.jsonl") for s in ("train", "dev", "test")}
        splits["train"], too_short = _drop_short(splits["train"], options.min_train_s)
        trials = {s: read_trials(expect_path(corpus_dir / "asv" / f"{s}_trials.txt", f"the {s} trial list",
                                             "synthetic corpus")) for s in ("dev", "test")}
        info = {"profile": data_cfg.profile, "root": str(corpus_dir), "test_trials": len(trials["test"]),
                "dev_trials": len(trials["dev"]), "train_dropped_short": too_short}
        audio_root = corpus_dir
        corpus = "synth"
    elif hf_location(data_cfg.root) is not None:
        splits, trials, rows, info = prepare_hf(data_cfg.root, options)
        audio_root, corpus = rows.dataset.audio_root, rows.corpus
        if corpus != "synth":
            splits = {split: with_gain(utts, options.gain_db) for split, utts in splits.items()}
            info["gain_db"] = options.gain_db
    else:
        if not data_cfg.root:
            raise DataError(f"ASV on the real corpus needs --data-root pointing at the {REAL_CORPUS} folder "
                            "(wav/ and veri_test.txt)")
        root = Path(data_cfg.root)
        splits, trials, info = prepare_real(root, options)
        splits = {split: with_gain(utts, options.gain_db) for split, utts in splits.items()}
        audio_root, corpus = root / "wav", REAL_CORPUS
        info["gain_db"] = options.gain_db
    if not splits["train"]:
        raise DataError(f"no ASV training utterances of at least task_options.min_train_s = {options.min_train_s} s")
    rule = SELECTION_RULE
    if options.checkpoint_selection == "superb_test":  # select on the test trials themselves (SUPERB)
        splits["dev"] = [Utterance(u.id, u.path, u.duration_s, u.speaker, "dev", u.labels) for u in splits["test"]]
        trials = {**trials, "dev": trials["test"]}
        info.update(dev_trials=len(trials["test"]), dev_speakers=[])
        rule = SUPERB_TEST_RULE
    speakers = tuple(sorted({u.speaker for u in splits["train"]}))
    info.update({"checkpoint_selection": rule, "min_train_s": options.min_train_s,
                 "max_crop_s": options.max_crop_s, "train_speakers": len(speakers)})
    return PreparedData(audio_root, splits, corpus, ASVData(speakers, trials, rule), info)


def train_crop_s(options: ASVOptions) -> float | None:
    return options.max_crop_s or None


def targets(utterances: Sequence[Utterance], prepared: PreparedData) -> torch.Tensor:
    index = {s: i for i, s in enumerate(prepared.label_space.speakers)}
    return torch.tensor([index[u.speaker] for u in utterances], dtype=torch.long)


# ---------------------------------------------------------------------------------------------- head and loss

class SpeakerEmbeddingOutput(NamedTuple):
    """``cosine [B, speakers]`` (cosine to every class centre; None outside training), ``embedding [B, E]`` and
    the AM-softmax scale and margin the loss applies."""

    cosine: torch.Tensor | None
    embedding: torch.Tensor
    scale: float
    margin: float


class TDNN(nn.Module):
    """One x-vector TDNN layer: a dilated 1-d convolution over time (no padding) + ReLU (+ batch norm).

    ``[B, C_in, T] -> [B, C_out, T - (context - 1) * dilation]``.
    """

    def __init__(self, in_dim: int, out_dim: int, context: int, dilation: int, batch_norm: bool = False,
                 he_init: bool = False):
        super().__init__()
        # PyTorch's default initialisation of a Conv1d over `context` frames is that of s3prl's Linear(in * context,
        # out) on unfolded frames: the same fan-in, the same uniform ranges
        self.conv = nn.Conv1d(in_dim, out_dim, context, dilation=dilation)
        if he_init:
            # with the default init the signal shrinks ~3x per ReLU layer, so after five layers the pooled statistics
            # are smaller than the biases and every utterance starts out with nearly the same embedding
            nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
            nn.init.zeros_(self.conv.bias)
        self.bn = nn.BatchNorm1d(out_dim) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x)))


def stats_pool(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean and unbiased standard deviation (as s3prl's ``torch.std``) over the valid frames: ``x [B, C, T]``,
    ``lengths [B]`` -> ``[B, 2C]``; 1e-6 inside the square root keeps the gradient finite for a constant channel."""
    mask = (torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None].to(x.device)).to(x.dtype)
    mask = mask[:, None, :]
    n = mask.sum(-1).clamp(min=1)
    mean = (x * mask).sum(-1) / n
    var = (((x - mean[..., None]) * mask) ** 2).sum(-1) / (n - 1).clamp(min=1)
    return torch.cat([mean, (var + 1e-6).sqrt()], dim=-1)


class XVectorHead(nn.Module):
    """s3prl's ASV head (module docstring): ``forward(x [B, T, D], lengths [B]) -> SpeakerEmbeddingOutput``."""

    def __init__(self, input_dim: int, num_speakers: int, options: ASVOptions):
        super().__init__()
        w, bn, he = options.input_dim, options.batch_norm, options.init == "he"
        self.connector = nn.Linear(input_dim, w)
        self.tdnn = nn.Sequential(TDNN(w, w, 5, 1, bn, he), TDNN(w, w, 3, 2, bn, he), TDNN(w, w, 3, 3, bn, he),
                                  TDNN(w, w, 1, 1, bn, he), TDNN(w, options.agg_dim, 1, 1, bn, he))
        self.segment6 = nn.Linear(2 * options.agg_dim, options.embedding_dim)
        self.segment7 = nn.Linear(options.embedding_dim, options.embedding_dim)
        if he:
            for layer in (self.segment6, self.segment7):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        self.centres = nn.Parameter(torch.empty(num_speakers, options.embedding_dim))
        nn.init.xavier_normal_(self.centres)
        self.scale, self.margin = options.am_scale, options.am_margin

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> SpeakerEmbeddingOutput:
        if x.dim() != 3 or lengths is None:
            raise ValueError("the ASV head needs frames x [B, T, D] with lengths [B]")
        lengths = lengths.to(x.device).long().clamp(min=1)
        need = XVECTOR_CONTEXT + 1
        if int(lengths.min()) < need:  # repeat short utterances' valid frames up to the TDNN context
            idx = torch.arange(max(need, x.shape[1]), device=x.device)[None, :] % lengths[:, None]
            x = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
            lengths = lengths.clamp(min=need)
        h = self.tdnn(self.connector(x).transpose(1, 2))  # [B, agg_dim, T - 14]
        embedding = F.relu(self.segment6(stats_pool(h, lengths - XVECTOR_CONTEXT)))
        cosine = None
        if self.training:
            hidden = F.relu(self.segment7(embedding))
            cosine = F.normalize(hidden, dim=-1) @ F.normalize(self.centres, dim=-1).t()
        return SpeakerEmbeddingOutput(cosine, embedding, self.scale, self.margin)


def am_softmax_loss(cosine: torch.Tensor, target: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """Additive-margin softmax: cross-entropy of ``scale * (cosine - margin * onehot(target))``; ``cosine [B, S]``."""
    margins = F.one_hot(target, cosine.shape[-1]).to(cosine.dtype) * margin
    return F.cross_entropy(scale * (cosine - margins), target)


def build_head(input_dim: int, prepared: PreparedData, options: ASVOptions) -> nn.Module:
    return XVectorHead(input_dim, len(prepared.label_space.speakers), options)


def loss(output: SpeakerEmbeddingOutput, target: torch.Tensor) -> torch.Tensor:
    if output.cosine is None:
        raise ValueError("the ASV loss needs the head's training-mode output (cosine to the speaker centres)")
    return am_softmax_loss(output.cosine, target, output.scale, output.margin)


def predict(output: SpeakerEmbeddingOutput, lengths: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One length-normalised embedding ``[E]`` (float32, CPU) per utterance."""
    return list(F.normalize(output.embedding.detach().float(), dim=-1).cpu())


# ---------------------------------------------------------------------------------------------- scoring

def references(utterances: Sequence[Utterance], prepared: PreparedData) -> TrialList:
    """The trial list of the split these utterances form (dev or test), as positions into ``utterances``."""
    splits = {u.split for u in utterances}
    if len(splits) != 1 or next(iter(splits)) not in prepared.label_space.trials:
        raise ValueError(f"ASV references need the utterances of one trial split, got splits {sorted(splits)}")
    split = splits.pop()
    position = {u.id: i for i, u in enumerate(utterances)}
    pairs = tuple(prepared.label_space.trials[split])
    missing = sorted({x for _, a, b in pairs for x in (a, b) if x not in position})
    if missing:
        raise DataError(f"{split} trial list names {len(missing)} utterance(s) missing from the {split} split, "
                        f"e.g. {missing[0]!r}")
    return TrialList(split, np.array([p[0] for p in pairs], dtype=int),
                     np.array([position[p[1]] for p in pairs], dtype=np.int64),
                     np.array([position[p[2]] for p in pairs], dtype=np.int64), pairs,
                     prepared.label_space.selection_rule)


def trial_scores(embeddings: Sequence[torch.Tensor], trials: TrialList) -> np.ndarray:
    """Cosine score of every trial ``[N]`` from length-normalised embeddings (one ``[E]`` per utterance)."""
    e = F.normalize(torch.stack(list(embeddings)).float(), dim=-1)
    enroll, test = torch.from_numpy(trials.enroll), torch.from_numpy(trials.test)
    return (e[enroll] * e[test]).sum(-1).numpy().astype(np.float64)


def score(embeddings: list[torch.Tensor], trials: TrialList) -> dict:
    """``eer`` (%, the metric), ``min_dcf`` (p_target 0.01), the trial count and the checkpoint-selection rule."""
    scores = trial_scores(embeddings, trials)
    return {"eer": equal_error_rate_percent(trials.labels, scores), "min_dcf": min_dcf(trials.labels, scores),
            "trials": len(trials), "checkpoint_selection": trials.selection_rule}


def write_outputs(run_dir: Path, utterances: Sequence[Utterance], embeddings: list[torch.Tensor],
                  trials: TrialList) -> None:
    """``scores.txt``: one ``<label> <enroll-id> <test-id> <cosine>`` line per test trial, in list order."""
    scores = trial_scores(embeddings, trials)
    atomic_write_text(run_dir / "scores.txt", "".join(f"{lab} {a} {b} {s:.6f}\n"
                                                      for (lab, a, b), s in zip(trials.pairs, scores, strict=True)))


def item_scores(embeddings: list[torch.Tensor], trials: TrialList, utterances: Sequence[Utterance]) -> list[dict]:
    """One item per test trial: ``id`` (``"<enroll-id> <test-id>"``), ``label``, cosine ``score`` and the speakers of
    both sides (``enroll_speaker``, ``test_speaker``), so that a bootstrap can resample speakers, not trials."""
    scores = trial_scores(embeddings, trials)
    speaker = {u.id: u.speaker for u in utterances}
    return [{"id": f"{a} {b}", "label": int(lab), "score": float(s), "enroll_speaker": speaker[a],
             "test_speaker": speaker[b]} for (lab, a, b), s in zip(trials.pairs, scores, strict=True)]


def protocol(prepared: PreparedData, options: ASVOptions) -> tuple[dict, list[str]]:
    """Facts: trial list name and size, checkpoint selection, training speakers; deviations from SUPERB's setting."""
    info = prepared.info
    trial_name = Path(info["trial_list"]).name if "trial_list" in info else "asv/test_trials.txt (synthetic)"
    facts = {"trial_list": trial_name, "trials": info["test_trials"], "test_scored": info["test_trials"],
             "checkpoint_selection": options.checkpoint_selection, "checkpoint_rule": info["checkpoint_selection"],
             "train_speakers": info["train_speakers"], "init": options.init, "batches": "random (reshuffled per epoch)"}
    deviations = []
    if options.checkpoint_selection == "dev_trials":
        held_out = len({u.speaker for u in prepared.splits["dev"]})
        deviations.append(f"checkpoint chosen on dev trials of {held_out} held-out "
                          "development speakers, who are not trained on (SUPERB: best test EER over the checkpoints, "
                          "task_options.checkpoint_selection=superb_test); expect a somewhat higher EER")
    if options.init != "default":
        deviations.append("He initialisation of the x-vector layers (s3prl: PyTorch's default)")
    if prepared.corpus != "synth":
        facts.update(test_official=OFFICIAL_TRIALS, gain_db=options.gain_db,
                     trial_list_sha256=info.get("trial_list_sha256"))
        if options.gain_db != S3PRL_GAIN_DB:
            deviations.append(f"audio gain {options.gain_db:g} dB (s3prl: {S3PRL_GAIN_DB:g} dB)")
    return facts, deviations


TASK = register_task(Task(
    name="asv", metric="eer", unit="%", higher_is_better=False, granularity="frames",
    options_cls=ASVOptions, prepare=prepare, targets=targets, build_head=build_head, loss=loss,
    predict=predict, references=references, score=score,
    summary="speaker verification, x-vector head with AM-softmax, cosine scoring, EER (dev-trial selection)",
    real_corpus=REAL_CORPUS, train_crop_s=train_crop_s, write_outputs=write_outputs, train_batching="random",
    protocol=protocol, item_scores=item_scores,
))
