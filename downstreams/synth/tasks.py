"""Per-task utterance plans: who says what, in which split, with which labels.

A plan is a list of :class:`Job` (one per audio file) built from a seeded Generator only, before any audio
exists, so ASV trials can be drawn here too. Rendering a job (``render.py``) is a pure function of the job and
the corpus seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from speechbench.downstreams.synth import lexicon
from speechbench.downstreams.synth.voices import Speaker, sample_speakers, twin_of

TASKS = ("ks", "ic", "er", "sid", "asv", "asr")  # PR reads the ASR manifests
TASK_CODES = {t: i + 1 for i, t in enumerate(TASKS)}  # stable integers for seeding
EMOTIONS = ("neu", "hap", "ang", "sad")


class Prosody(NamedTuple):
    """How one utterance departs from its speaker's baseline; the defaults (every non-ER task) = not at all."""

    pitch: float = 0.0  # espeak pitch offset (0-100 scale)
    range: float = 0.0  # espeak pitch-range offset
    rate: float = 1.0  # speaking-rate factor
    tilt_db: float = 0.0  # spectral tilt: gain above ~1 kHz in dB (>0 brighter / pressed, <0 darker / lax)
    breath_db: float | None = None  # aspiration noise relative to the speech, dB (None: none added)


# Emotion = change RELATIVE to the speaker's baseline. Pitch, range and rate alone were nearly invisible to a
# time-averaged spectrum of an unseen speaker (fbank_no_cmvn: ~27 % ER accuracy, chance 25 %), so the emotions also
# change voice quality, as real emotional speech does: vocal effort tilts the spectrum (angry: pressed, much more
# energy above ~1 kHz and less breath; happy: a little brighter) and sad is lax (darker) and breathy. The tilt and
# breath offsets are large because background noise and the time average hide much of them; they add to the
# speaker's own random tilt and breathiness (``plan_er``) and are jittered per utterance, so emotions overlap across
# speakers. Loudness is deliberately not part of it (levels are normalised away in rendering).
EMOTION_PROSODY = {
    "neu": Prosody(0.0, 0.0, 1.00, 0.0, 0.0),
    "hap": Prosody(10.0, 20.0, 1.08, 5.0, 0.0),
    "ang": Prosody(4.0, 12.0, 1.14, 14.0, -6.0),
    "sad": Prosody(-9.0, -18.0, 0.84, -12.0, 12.0),
}
SPEAKER_TILT_DB = (-3.0, 3.0)  # range of a speaker's baseline spectral tilt (ER)
SPEAKER_BREATH_DB = (-34.0, -24.0)  # range of a speaker's baseline breathiness (ER)


@dataclass(frozen=True)
class Job:
    """Everything needed to render one utterance."""

    task: str
    index: int  # position in the task's plan: seeds this utterance's randomness
    id: str
    split: str
    speaker: Speaker
    text: str  # what espeak says; "" = no speech (KS _silence_)
    labels: dict = field(default_factory=dict)
    clip_s: float | None = None  # fixed clip length (KS)
    prosody: Prosody = Prosody()
    phonemes: bool = False  # add a "phonemes" label
    attempt: int = 0  # bumped to re-draw the jitter after a duplicate


@dataclass(frozen=True)
class Sizes:
    """(speakers, utterances per speaker) for the train, dev and test splits."""

    train: tuple[int, int]
    dev: tuple[int, int]
    test: tuple[int, int]


@dataclass(frozen=True)
class Profile:
    ks: Sizes
    ic: Sizes
    er: tuple[int, int]  # speakers per fold (5 folds), sentences per speaker (each said in all 4 emotions)
    sid: tuple[int, int, int, int]  # speakers; utterances per speaker in train, dev, test
    asv: Sizes  # train: development speakers; dev/test: trial speakers (even: they come in look-alike pairs)
    asv_trials: tuple[int, int]  # dev, test trial counts (at most; half target, half nontarget)
    asr: Sizes


@dataclass
class Plan:
    jobs: list[Job]
    speakers: list[Speaker]
    trials: dict[str, list[tuple[int, str, str]]] = field(default_factory=dict)  # split -> (label, enroll, test)


def _rng(seed: int, task: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, TASK_CODES[task], 1_000_003, stream])


def _split_speakers(speakers: list[Speaker], sizes: Sizes) -> dict[str, list[Speaker]]:
    out, start = {}, 0
    for split in ("train", "dev", "test"):
        n = getattr(sizes, split)[0]
        out[split] = speakers[start: start + n]
        start += n
    return out


def _total_speakers(sizes: Sizes) -> int:
    return sizes.train[0] + sizes.dev[0] + sizes.test[0]


class _Ids:
    def __init__(self, task: str) -> None:
        self.task, self.counts, self.index = task, {}, 0

    def next(self, split: str) -> tuple[int, str]:
        k = self.counts.get(split, 0)
        self.counts[split] = k + 1
        self.index += 1
        return self.index - 1, f"{self.task}-{split}-{k:06d}"


def _apportion(n: int, weights: dict[str, float]) -> list[str]:
    """``n`` labels in proportion to ``weights`` (largest remainder), every label at least once if n allows."""
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    counts = {k: max(1, int(v)) if n >= len(weights) else int(v) for k, v in exact.items()}
    for k in sorted(weights, key=lambda k: exact[k] - int(exact[k]), reverse=True):
        if sum(counts.values()) >= n:
            break
        counts[k] += 1
    while sum(counts.values()) > n:  # the minimum of 1 may overshoot: take from the largest
        counts[max(counts, key=counts.get)] -= 1
    return [k for k in weights for _ in range(counts[k])]


def plan_ks(p: Profile, seed: int) -> Plan:
    rng, ids = _rng(seed, "ks", 0), _Ids("ks")
    speakers = sample_speakers(rng, "ks-s", _total_speakers(p.ks))
    jobs = []
    # Speech Commands-like: _unknown_ is the most frequent class in train/dev; test is balanced like the
    # official v0.01 test set.
    skewed = {**{w: 1.0 for w in lexicon.KS_WORDS}, lexicon.KS_UNKNOWN: 3.0, lexicon.KS_SILENCE: 1.0}
    balanced = {k: 1.0 for k in lexicon.KS_CLASSES}
    for split, spk in _split_speakers(speakers, p.ks).items():
        n = len(spk) * getattr(p.ks, split)[1]
        labels = _apportion(n, balanced if split == "test" else skewed)
        labels = [labels[i] for i in rng.permutation(len(labels))]
        for k, label in enumerate(labels):
            if label == lexicon.KS_SILENCE:
                text = ""
            elif label == lexicon.KS_UNKNOWN:
                text = lexicon.KS_UNKNOWN_WORDS[int(rng.integers(len(lexicon.KS_UNKNOWN_WORDS)))]
            else:
                text = label
            index, uid = ids.next(split)
            jobs.append(Job("ks", index, uid, split, spk[k % len(spk)], text, {"keyword": label}, clip_s=1.0))
    return Plan(jobs, speakers)


def plan_ic(p: Profile, seed: int) -> Plan:
    rng, ids = _rng(seed, "ic", 0), _Ids("ic")
    speakers = sample_speakers(rng, "ic-s", _total_speakers(p.ic))
    intents = lexicon.ic_intents()
    jobs = []
    for split, spk in _split_speakers(speakers, p.ic).items():
        for s in spk:
            for _ in range(getattr(p.ic, split)[1]):
                action, obj, loc, texts = intents[int(rng.integers(len(intents)))]
                text = texts[int(rng.integers(len(texts)))]
                index, uid = ids.next(split)
                labels = {"action": action, "object": obj, "location": loc, "text": text}
                jobs.append(Job("ic", index, uid, split, s, text, labels))
    return Plan(jobs, speakers)


def plan_er(p: Profile, seed: int) -> Plan:
    rng, ids = _rng(seed, "er", 0), _Ids("er")
    voice_rng = _rng(seed, "er", 1)  # a stream of its own: speakers and sentences as in corpus version 2
    per_fold, n_sent = p.er
    speakers = sample_speakers(rng, "er-s", 5 * per_fold)
    jobs = []
    for fold in range(1, 6):
        split = f"fold{fold}"
        for s in speakers[(fold - 1) * per_fold: fold * per_fold]:
            # the same sentences in every emotion, so the words carry no emotion information
            sentences = rng.choice(len(lexicon.ER_SENTENCES), n_sent, replace=n_sent > len(lexicon.ER_SENTENCES))
            # this speaker's own voice quality: the emotions' tilt and breath offsets are relative to it
            tilt, breath = voice_rng.uniform(*SPEAKER_TILT_DB), voice_rng.uniform(*SPEAKER_BREATH_DB)
            for j in sentences:
                text = lexicon.ER_SENTENCES[int(j)]
                for emotion in EMOTIONS:
                    index, uid = ids.next(split)
                    labels = {"emotion": emotion, "fold": fold, "text": text}
                    e = EMOTION_PROSODY[emotion]
                    prosody = e._replace(tilt_db=float(tilt + e.tilt_db), breath_db=float(breath + e.breath_db))
                    jobs.append(Job("er", index, uid, split, s, text, labels, prosody=prosody))
    return Plan(jobs, speakers)


def _words_for(speaker: Speaker) -> tuple[int, int]:
    """Word-count bounds that give 2-5 s clips (speech plus margins) at this speaker's rate."""
    words_per_s = speaker.rate / 60.0 * 0.9
    return max(4, int(np.ceil(2.5 * words_per_s))), max(5, int(4.0 * words_per_s))


def plan_sid(p: Profile, seed: int) -> Plan:
    rng, ids = _rng(seed, "sid", 0), _Ids("sid")
    n_spk, *per_split = p.sid
    speakers = sample_speakers(rng, "sid-s", n_spk)
    jobs = []
    for split, n in zip(("train", "dev", "test"), per_split, strict=True):
        for s in speakers:
            for _ in range(n):
                text = lexicon.sentence(rng, *_words_for(s))
                index, uid = ids.next(split)
                jobs.append(Job("sid", index, uid, split, s, text, {"text": text.upper()}))
    return Plan(jobs, speakers)


def _trials(rng: np.random.Generator, by_speaker: dict[str, list[str]], twins: dict[str, str], n: int,
            ) -> list[tuple[int, str, str]]:
    """Balanced trials: half target pairs, half nontarget of which half are look-alike (twin) pairs."""
    spk = sorted(by_speaker)
    targets = [(1, a, b) for s in spk for i, a in enumerate(by_speaker[s]) for b in by_speaker[s][i + 1:]]
    hard = [(0, a, b) for s in spk if twins.get(s, "") > s for a in by_speaker[s] for b in by_speaker[twins[s]]]
    easy = [(0, a, b) for i, s in enumerate(spk) for t in spk[i + 1:] if twins.get(s) != t
            for a in by_speaker[s] for b in by_speaker[t]]
    n_pos = min(n // 2, len(targets), len(hard) + len(easy))
    n_hard = min(len(hard), n_pos // 2)
    n_easy = min(len(easy), n_pos - n_hard)
    n_hard = n_pos - n_easy

    def take(pool, k):
        return [pool[int(i)] for i in sorted(rng.choice(len(pool), k, replace=False))]

    trials = take(targets, n_pos) + take(hard, n_hard) + take(easy, n_easy)
    trials = [trials[int(i)] for i in rng.permutation(len(trials))]
    # enrol/test order random too, so position carries no information
    return [(lab, a, b) if rng.random() < 0.5 else (lab, b, a) for lab, a, b in trials]


def plan_asv(p: Profile, seed: int) -> Plan:
    rng, ids = _rng(seed, "asv", 0), _Ids("asv")
    n_dev, n_test = p.asv.dev[0] // 2 * 2, p.asv.test[0] // 2 * 2
    base = sample_speakers(rng, "asv-s", p.asv.train[0] + n_dev // 2 + n_test // 2)
    train = base[: p.asv.train[0]]
    firsts = base[p.asv.train[0]:]
    twins_of = [twin_of(rng, f"asv-s{len(base) + i:04d}", s) for i, s in enumerate(firsts)]
    groups = {"train": train}
    twins: dict[str, str] = {}
    for split, lo, hi in (("dev", 0, n_dev // 2), ("test", n_dev // 2, n_dev // 2 + n_test // 2)):
        groups[split] = []
        for a, b in zip(firsts[lo:hi], twins_of[lo:hi], strict=True):
            groups[split] += [a, b]
            twins[a.id], twins[b.id] = b.id, a.id
    jobs = []
    plan = Plan(jobs, train + firsts + twins_of)
    for split in ("train", "dev", "test"):
        by_speaker: dict[str, list[str]] = {}
        n_utts = getattr(p.asv, split)[1]
        said = [(s, lexicon.sentence(rng, *_words_for(s))) for s in groups[split] for _ in range(n_utts)]
        for k in rng.permutation(len(said)):  # shuffled, so that id numbers say nothing about who speaks
            s, text = said[int(k)]
            index, uid = ids.next(split)
            jobs.append(Job("asv", index, uid, split, s, text, {"text": text.upper()}))
            by_speaker.setdefault(s.id, []).append(uid)
        if split != "train":
            n_trials = p.asv_trials[0 if split == "dev" else 1]
            plan.trials[split] = _trials(rng, by_speaker, twins, n_trials)
    return plan


def plan_asr(p: Profile, seed: int) -> Plan:
    rng, ids = _rng(seed, "asr", 0), _Ids("asr")
    speakers = sample_speakers(rng, "asr-s", _total_speakers(p.asr))
    seen: set[str] = set()  # every sentence once in the whole task: dev/test texts never occur in train
    jobs = []
    for split, spk in _split_speakers(speakers, p.asr).items():
        for s in spk:
            for _ in range(getattr(p.asr, split)[1]):
                text = lexicon.sentence(rng, *_words_for(s))
                while text in seen:
                    text = lexicon.sentence(rng, *_words_for(s))
                seen.add(text)
                index, uid = ids.next(split)
                jobs.append(Job("asr", index, uid, split, s, text, {"text": text.upper()}, phonemes=True))
    return Plan(jobs, speakers)


PLANNERS = {"ks": plan_ks, "ic": plan_ic, "er": plan_er, "sid": plan_sid, "asv": plan_asv, "asr": plan_asr}
