"""The synthetic corpus generator (downstreams/synth): layout, determinism, anti-shortcut measures, caching."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechbench.downstreams.data import DataError, read_manifest
from speechbench.downstreams.synth import corpus as synth_corpus
from speechbench.downstreams.synth.corpus import (
    CORPUS_VERSION,
    PHONE_SET,
    PROFILES,
    corpus_info,
    ensure_corpus,
    generate_corpus,
)
from speechbench.downstreams.synth.espeak import Espeak
from speechbench.downstreams.synth.lexicon import KS_CLASSES

MANIFESTS = {
    "ks": ("train", "dev", "test"), "ic": ("train", "dev", "test"), "er": ("utterances",),
    "sid": ("train", "dev", "test"), "asv": ("train", "dev", "test"), "asr": ("train", "dev", "test"),
}
LABELS = {"ks": {"keyword"}, "ic": {"action", "object", "location", "text"}, "er": {"emotion", "fold", "text"},
          "sid": set(), "asv": set(), "asr": {"text", "phonemes"}}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("synth") / "tiny", "tiny", seed=0, progress=False)


def _rows(root: Path, task: str) -> dict:
    return {name: read_manifest(root / task / f"{name}.jsonl") for name in MANIFESTS[task]}


def _digest(root: Path) -> dict[str, str]:
    """sha1 of every file, corpus.json without its timing field."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "corpus.json":
                info = json.loads(data)
                info.pop("generation_s")
                data = json.dumps(info, sort_keys=True).encode()
            out[str(p.relative_to(root))] = hashlib.sha1(data).hexdigest()
    return out


def _longest_zero_run(x: np.ndarray) -> int:
    z = np.concatenate([[0], (x == 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(z))
    return int((edges[1::2] - edges[::2]).max()) if len(edges) else 0


def test_layout_fields_and_audio(tiny):
    info = corpus_info(tiny)
    assert (info["name"], info["version"], info["profile"], info["seed"], info["sample_rate"]) == \
        ("speechbench-synth", CORPUS_VERSION, "tiny", 0, 16000)
    ids = set()
    for task in MANIFESTS:
        for name, utts in _rows(tiny, task).items():
            assert utts, f"{task}/{name} is empty"
            for u in utts:
                assert u.id not in ids
                ids.add(u.id)
                assert u.path == f"wavs/{task}/{u.id}.wav"
                assert LABELS[task] <= set(u.labels), (task, u.labels)
                if task != "er":
                    assert u.split == name
                wav = sf.info(str(tiny / u.path))
                assert (wav.samplerate, wav.channels, wav.subtype) == (16000, 1, "PCM_16")
                assert abs(wav.frames / 16000 - u.duration_s) < 1e-3
        counted = Counter(u.split for utts in _rows(tiny, task).values() for u in utts)
        assert dict(counted) == info["counts"][task]
    assert len(list((tiny / "wavs").rglob("*.wav"))) == len(ids)

    ks = _rows(tiny, "ks")
    assert all(u.duration_s == 1.0 for utts in ks.values() for u in utts)
    train = Counter(u.labels["keyword"] for u in ks["train"])
    assert set(train) == set(KS_CLASSES) and train.most_common(1)[0][0] == "_unknown_"
    er = _rows(tiny, "er")["utterances"]
    assert {u.labels["emotion"] for u in er} == {"neu", "hap", "ang", "sad"}
    assert {u.labels["fold"] for u in er} == {1, 2, 3, 4, 5}
    assert all(u.split == f"fold{u.labels['fold']}" for u in er)
    for u in _rows(tiny, "asr")["train"]:
        assert u.labels["text"] == u.labels["text"].upper()
        phones = u.labels["phonemes"].split(" ")
        assert phones and set(phones) <= set(PHONE_SET)


def test_speaker_disjoint_splits(tiny):
    def speakers(utts):
        return {u.speaker for u in utts}

    for task in ("ks", "ic", "asr", "asv"):
        rows = _rows(tiny, task)
        for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
            assert not speakers(rows[a]) & speakers(rows[b]), (task, a, b)
    folds = [speakers([u for u in _rows(tiny, "er")["utterances"] if u.labels["fold"] == k]) for k in range(1, 6)]
    assert all(not folds[i] & folds[j] for i in range(5) for j in range(i + 1, 5))
    sid = _rows(tiny, "sid")  # closed set: the same speakers everywhere, different utterances
    assert speakers(sid["train"]) == speakers(sid["dev"]) == speakers(sid["test"])


def test_asv_trials(tiny):
    info = json.loads((tiny / "speakers.json").read_text())
    spk = {s["id"]: s for s in info["asv"]}
    for split in ("dev", "test"):
        utts = {u.id: u for u in read_manifest(tiny / "asv" / f"{split}.jsonl")}
        trials = [line.split() for line in (tiny / "asv" / f"{split}_trials.txt").read_text().splitlines()]
        labels = Counter(t[0] for t in trials)
        assert labels["1"] == labels["0"] > 0 and set(labels) == {"0", "1"}
        hard = 0
        for label, a, b in trials:
            assert a in utts and b in utts and a != b
            same = utts[a].speaker == utts[b].speaker
            assert same == (label == "1")
            sa, sb = spk[utts[a].speaker], spk[utts[b].speaker]
            hard += (not same and sa["accent"] == sb["accent"] and sa["gender"] == sb["gender"]
                     and sa["family"] == sb["family"] and abs(sa["pitch"] - sb["pitch"]) <= 5)
        assert hard > 0, f"{split}: no hard negative trials"


@pytest.mark.slow
def test_same_seed_is_byte_identical_other_seed_differs(tiny, tmp_path):
    again = generate_corpus(tmp_path / "again", "tiny", seed=0, progress=False)
    assert _digest(again) == _digest(tiny)
    other = _digest(generate_corpus(tmp_path / "other", "tiny", seed=1, progress=False))
    base = _digest(tiny)
    wavs = [k for k in base if k.endswith(".wav")]
    assert sum(base[k] != other.get(k) for k in wavs) == len(wavs)


@pytest.mark.slow
def test_worker_processes_give_the_same_audio(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(synth_corpus, "_IN_PROCESS_MAX_JOBS", 0)  # force the worker pool even for tiny
    out = synth_corpus._generate(tmp_path / "ks", "tiny", 0, progress=False, tasks=("ks",), workers=2,
                                 profile_name="tiny")
    pooled, base = _digest(out), _digest(tiny)
    ks_files = [k for k in pooled if k.startswith(("wavs/ks/", "ks/"))]
    assert ks_files and all(pooled[k] == base[k] for k in ks_files)


def test_espeak_sessions_are_reproducible():
    def say():
        with Espeak() as tts:
            first = tts.synth("the red dog", "en-us+m3", rate=175, pitch=50, pitch_range=50)
            second = tts.synth("the red dog", "en-us+m3", rate=175, pitch=50, pitch_range=50)
        return first, second

    a1, a2 = say()
    b1, b2 = say()
    assert np.array_equal(a1, b1) and np.array_equal(a2, b2)  # a fresh session replays exactly
    assert a1.size > 0


def test_no_digital_silence(tiny):
    for wav in sorted((tiny / "wavs").rglob("*.wav")):
        x, _ = sf.read(str(wav), dtype="int16")
        assert _longest_zero_run(x) < 50, wav.name


@pytest.mark.slow
def test_loudness_does_not_reveal_emotion(tmp_path):
    profile = dataclasses.replace(PROFILES["tiny"], er=(4, 6))  # 480 utterances: a stable accuracy estimate
    root = synth_corpus._generate(tmp_path / "er", profile, 0, progress=False, tasks=("er",))
    feats, labels, folds = [], [], []
    for u in read_manifest(root / "er" / "utterances.jsonl"):
        x, _ = sf.read(str(root / u.path))
        feats.append([10 * np.log10(np.mean(x ** 2)), 20 * np.log10(np.max(np.abs(x)))])
        labels.append(u.labels["emotion"])
        folds.append(u.labels["fold"])
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats, labels, folds = np.array(feats), np.array(labels), np.array(folds)
    train, test = folds < 5, folds == 5
    clf = make_pipeline(StandardScaler(), LogisticRegression()).fit(feats[train], labels[train])
    assert clf.score(feats[test], labels[test]) < 0.40


def _band_ratio_db(x: np.ndarray) -> float:
    """Energy at 1-4 kHz relative to 0.1-1 kHz, in dB: the spectral balance that vocal effort moves."""
    from scipy.signal import welch

    f, p = welch(x, 16000, nperseg=512)
    return float(10 * np.log10(p[(f >= 1000) & (f < 4000)].sum() / p[(f >= 100) & (f < 1000)].sum()))


def test_emotions_change_voice_quality_relative_to_the_speaker(tiny):
    from speechbench.downstreams.synth.tasks import plan_er

    # the offsets ride on each speaker's own baseline: neutral itself differs between speakers
    neutral = {j.speaker.id: j.prosody for j in plan_er(PROFILES["tiny"], 0).jobs if j.labels["emotion"] == "neu"}
    assert len({p.tilt_db for p in neutral.values()}) == len(neutral) > 1
    assert len({p.breath_db for p in neutral.values()}) == len(neutral)
    # in the audio, for the same speaker and sentence: angry brighter than neutral, neutral brighter than sad
    ratio = {}
    for u in _rows(tiny, "er")["utterances"]:
        x, _ = sf.read(str(tiny / u.path))
        ratio[(u.speaker, u.labels["text"], u.labels["emotion"])] = _band_ratio_db(x)
    pairs = {(s, t) for s, t, _ in ratio}
    assert np.mean([ratio[(s, t, "ang")] > ratio[(s, t, "neu")] for s, t in pairs]) >= 0.9
    assert np.mean([ratio[(s, t, "neu")] > ratio[(s, t, "sad")] for s, t in pairs]) >= 0.7


def test_ensure_corpus_reuses_and_repairs(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    target = cache / f"tiny-seed0-v{CORPUS_VERSION}"
    shutil.copytree(tiny, target)

    def no_generation(*args, **kwargs):
        raise AssertionError("a complete cached corpus must not be regenerated")

    with monkeypatch.context() as m:
        m.setattr(synth_corpus, "_generate", no_generation)
        assert ensure_corpus("tiny", 0, cache_dir=cache, progress=False) == target

    (target / "corpus.json").unlink()  # as if generation had been interrupted
    (target / "wavs" / "ks" / "ks-train-000000.wav").write_bytes(b"junk")
    assert ensure_corpus("tiny", 0, cache_dir=cache, progress=False) == target
    assert _digest(target) == _digest(tiny)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp/stale dirs left behind

    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path / "env"))
    assert synth_corpus.default_cache_dir() == tmp_path / "env" / "synth"


def test_refusals_and_errors(tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not an empty directory"):
        generate_corpus(busy, "tiny", progress=False)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(DataError, match="unknown synthetic corpus profile"):
        generate_corpus(tmp_path / "x", "huge", progress=False)
    with pytest.raises(DataError, match="no corpus.json"):
        corpus_info(busy)
    (busy / "corpus.json").write_text("{broken")
    with pytest.raises(DataError, match="invalid corpus.json"):
        corpus_info(busy)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
