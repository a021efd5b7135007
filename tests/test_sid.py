"""SID (VoxCeleb1): real-layout preparation from iden_split.txt, layout errors, training crops, short runs."""

import json
import shutil
from pathlib import Path

import pytest
from helpers import write_noise_wav

from speechbench.benchmark.run import RunRequest, run
from speechbench.downstreams import sid
from speechbench.downstreams.data import DataError

SPEAKERS = ("id10001", "id10002", "id10003")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_voxceleb1(base: Path, seconds: float = 1.0) -> Path:
    """A tiny tree in the real VoxCeleb1 layout: wav/<speaker>/<video>/<utt>.wav plus iden_split.txt."""
    root = base / "VoxCeleb1"
    lines = []
    for s, spk in enumerate(SPEAKERS):
        for v, video in enumerate(("1zcIwhmdeo4", "7w0IBEWc9Qw")):
            for u in range(3):
                rel = f"{spk}/{video}/{u + 1:05d}.wav"
                write_noise_wav(root / "wav" / rel, seconds + 0.25 * u, seed=100 * s + 10 * v + u, gain=0.02 * (s + 1))
                code = 1 if v == 0 else 2 if u == 0 else 3
                lines.append(f"{code} {rel}")
    # a test utterance of a speaker never seen in training
    write_noise_wav(root / "wav" / "id10009/abcdefghijk/00001.wav", seconds, seed=999, gain=0.05)
    lines.append("3 id10009/abcdefghijk/00001.wav")
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    return root


def test_prepare_real_voxceleb1(tmp_path):
    root = make_voxceleb1(tmp_path)
    splits = sid.prepare_real(root)
    assert {s: len(u) for s, u in splits.items()} == {"train": 9, "dev": 3, "test": 7}
    first = splits["train"][0]
    assert (first.id, first.path, first.speaker, first.labels) == (
        "id10001/1zcIwhmdeo4/00001", "id10001/1zcIwhmdeo4/00001.wav", "id10001", {"label": "id10001"})
    assert first.duration_s == pytest.approx(1.0)
    assert sid.classes(splits["train"]) == SPEAKERS
    # an unseen test speaker cannot be predicted: it counts as wrong, it does not crash
    assert sid.score(["id10001", "id10002"], ["id10001", "id10009"]) == {"accuracy": 50.0}


def test_training_crop_option():
    assert sid.train_crop_s(sid.SIDOptions()) == 8.0
    assert sid.train_crop_s(sid.SIDOptions(train_crop_s=None)) is None
    assert sid.TASK.train_crop_s is sid.train_crop_s


def test_wrong_layouts_give_one_line_errors(tmp_path):
    root = make_voxceleb1(tmp_path)
    (root / "iden_split.txt").rename(root / "splits.txt")
    with pytest.raises(DataError, match=r"iden_split.txt: expected the identification split iden_split.txt .*"
                                        r"found in .*VoxCeleb1: splits.txt, wav"):
        sid.prepare_real(root)
    bad = root / "splits.txt"
    (root / "iden_split.txt").write_text("1 id10001/1zcIwhmdeo4/00001.wav\n4 id10001/x/00002.wav\n")
    with pytest.raises(DataError, match=r"iden_split.txt:2: expected '<1\|2\|3> <speaker>/<video>/<utt>.wav', "
                                        r"found '4 id10001/x/00002.wav'"):
        sid.prepare_real(root)
    bad.rename(root / "iden_split.txt")
    (root / "wav" / "id10002" / "7w0IBEWc9Qw" / "00003.wav").unlink()
    with pytest.raises(DataError, match=r"id10002/7w0IBEWc9Qw/00003.wav: expected the wav file listed in "
                                        r"iden_split.txt \(1 of 19 listed files missing\) of the VoxCeleb1 layout"):
        sid.prepare_real(root)
    (root / "wav").rename(root / "audio")
    with pytest.raises(DataError, match=r"wav: expected the wav/ folder") as err:
        sid.prepare_real(root)
    assert "\n" not in str(err.value)
    (root / "audio").rename(root / "wav")
    write_noise_wav(root / "wav" / "id10002" / "7w0IBEWc9Qw" / "00003.wav", 1.0, seed=0, gain=0.01)
    shutil.rmtree(root / "wav" / "id10003")
    with pytest.raises(DataError, match=r"wav/id10003: expected the speaker folder listed in iden_split.txt "
                                        r"\(6 of 19 listed files missing\) .* found in .*wav: id10001, id10002, "
                                        r"id10009"):
        sid.prepare_real(root)


def test_short_run_on_the_real_layout_with_training_crops(tmp_path, monkeypatch):
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path / "cache"))
    root = make_voxceleb1(tmp_path)
    (row,) = run(RunRequest(upstream="fbank_no_cmvn", task="sid", data_root=str(root), out_dir=str(tmp_path / "out"),
                            overrides=("train.max_steps=20", "train.eval_every=10", "task_options.train_crop_s=0.8")))
    assert row["recipe"]["name"] == "superb/sid" and row["data"]["corpus"] == "VoxCeleb1"
    assert row["steps"] == 20 and 0.0 <= row["value"] <= 100.0 * 6 / 7  # one test speaker is unseen
    assert "0.8 s training crops" in row["features"] and "pooled" not in row["features"]
    # without crops the utterance-level head trains exactly on pooled features
    (row,) = run(RunRequest(upstream="fbank_no_cmvn", task="sid", data_root=str(root), out_dir=str(tmp_path / "out"),
                            overrides=("train.max_steps=20", "train.eval_every=10", "task_options.train_crop_s=null")))
    assert row["features"].startswith("pooled")
    assert sorted(p.name for p in root.iterdir()) == ["iden_split.txt", "wav"]  # nothing written into the corpus


def test_synthetic_corpus_run(tmp_path, synth_tiny):
    (row,) = run(RunRequest(upstream="fbank_no_cmvn", task="sid", out_dir=str(tmp_path),
                            overrides=("data.profile=tiny", "train.max_steps=20", "train.eval_every=10")))
    assert row["data"]["corpus"] == "synth" and row["features"].startswith("pooled")  # clips shorter than 8 s
    run_dir = next((tmp_path / "fbank_no_cmvn" / "sid").iterdir())
    rows = {s: [json.loads(x) for x in (run_dir / "manifests" / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "test")}
    assert all(r["label"] == r["speaker"] for r in rows["train"])
    assert {r["speaker"] for r in rows["test"]} <= {r["speaker"] for r in rows["train"]}  # closed set
