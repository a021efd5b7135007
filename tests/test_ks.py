import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import write_noise_wav

from speechbench.benchmark.config import RunConfig
from speechbench.downstreams.data import DataError, load_utterance_audio
from speechbench.downstreams.ks import CLASSES, WORDS, KSOptions, prepare, prepare_real
from speechbench.downstreams.tasks import get_task

EXTRA_WORDS = ("bed", "cat")


def make_speech_commands(base: Path) -> tuple[Path, Path]:
    """A tiny tree in the real Speech Commands v0.01 layout (noise instead of speech)."""
    root, test_root = base / "speech_commands_v0.01", base / "speech_commands_test_set_v0.01"
    val, test = [], []
    for w, word in enumerate(WORDS + EXTRA_WORDS):
        for s in range(4):
            rel = f"{word}/spk{s:02d}ab_nohash_0.wav"
            write_noise_wav(root / rel, seed=w * 10 + s, gain=0.1)
            (val if s == 2 else test if s == 3 else []).append(rel)
    write_noise_wav(root / "_background_noise_" / "white_noise.wav", seconds=12.5, gain=0.1)
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    for c, label in enumerate(CLASSES):
        write_noise_wav(test_root / label / f"t{c}_nohash_0.wav", seed=100 + c, gain=0.1)
    return root, test_root


def test_prepare_real_speech_commands(tmp_path):
    root, _ = make_speech_commands(tmp_path)
    splits = prepare_real(root, None)
    train = Counter(u.labels["keyword"] for u in splits["train"])
    assert train["yes"] == 2 and train["_unknown_"] == 4  # bed + cat, two training files each
    silence = [u for s in ("train", "dev") for u in splits[s] if u.labels["keyword"] == "_silence_"]
    assert len(silence) == 12 and all(u.duration_s == 1.0 for u in silence)  # floor(12.5 s) one-second crops
    assert sorted({u.labels["offset_s"] for u in silence}) == [float(k) for k in range(12)]
    assert Counter(u.labels["keyword"] for u in splits["dev"])["no"] == 1
    assert sorted(u.labels["keyword"] for u in splits["test"]) == sorted(CLASSES)
    speech = {s: {u.path for u in splits[s] if u.labels["keyword"] != "_silence_"} for s in ("train", "dev")}
    assert not speech["train"] & speech["dev"]
    assert not {u.id for u in splits["train"]} & {u.id for u in splits["dev"]}
    assert all(Path(u.path).is_absolute() for u in splits["test"])


def test_wrong_layout_errors_name_what_was_expected(tmp_path):
    root, test_root = make_speech_commands(tmp_path)
    (root / "validation_list.txt").unlink()
    with pytest.raises(DataError, match=r"validation_list.txt: expected validation_list.txt of the "
                                        r"speech_commands_v0.01 layout, not found; found in .*: _background_noise_"):
        prepare_real(root, None)
    (root / "validation_list.txt").write_text("")
    with pytest.raises(DataError, match="expected the official test set folder"):
        prepare_real(root, tmp_path / "elsewhere")
    (test_root / "_silence_" / "t11_nohash_0.wav").unlink()
    (test_root / "_silence_").rmdir()
    with pytest.raises(DataError, match=r"_silence_: expected the test folder _silence_/"):
        prepare_real(root, None)
    with pytest.raises(DataError, match="expected the corpus folder"):
        prepare_real(tmp_path / "missing", None)


def test_real_corpus_gain_class_balanced_weights_and_protocol_facts(tmp_path):
    root, _ = make_speech_commands(tmp_path)
    data = dataclasses.replace(RunConfig(task="ks").data, corpus="real", root=str(root))
    prepared = prepare(data, KSOptions())
    train = prepared.splits["train"]
    assert all(u.labels["gain_db"] == -3.0 for s in prepared.splits.values() for u in s)
    quiet = load_utterance_audio(train[0], prepared.audio_root)
    plain = load_utterance_audio(dataclasses.replace(train[0], labels={**train[0].labels, "gain_db": 0.0}),
                                 prepared.audio_root)
    np.testing.assert_allclose(quiet, plain * 10 ** (-3 / 20), rtol=1e-6)  # s3prl's sox "gain -3.0"
    task = get_task("ks")
    weights = task.sample_weights(train, prepared, KSOptions())
    mass = Counter()
    for u, w in zip(train, weights, strict=True):
        mass[u.labels["keyword"]] += w
    assert len(mass) == 12 and max(mass.values()) == pytest.approx(min(mass.values()))  # each class 1/12
    assert task.sample_weights(train, prepared, KSOptions(sampling="uniform")) is None
    facts, deviations = task.protocol(prepared, KSOptions())
    assert facts["sampling"] == "class_balanced" and facts["dev_selection"].startswith("accuracy on a class-balanced")
    assert (facts["test_official"], facts["gain_db"], deviations) == (3081, -3.0, [])
    _, deviations = task.protocol(prepared, KSOptions(sampling="uniform"))
    assert len(deviations) == 1 and deviations[0].startswith("uniform sampling")
    with pytest.raises(DataError, match="task_options.sampling must be one of class_balanced, uniform"):
        prepare(data, KSOptions(sampling="balanced"))
