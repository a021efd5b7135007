"""ER (IEMOCAP): label parsing, leave-one-session-out folds, layout errors, five-fold runs and their mean."""

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import write_noise_wav

from speechbench.benchmark.cli import fold_means, main
from speechbench.benchmark.run import RunRequest, run
from speechbench.downstreams import er
from speechbench.downstreams.data import DataError, read_manifest

HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
# per dialog: (turn suffix, emotion code); exc -> hap, fru/xxx/sur dropped
TURNS = [("F000", "neu"), ("M000", "exc"), ("F001", "ang"), ("M001", "sad"), ("F002", "hap"), ("M002", "fru"),
         ("F003", "xxx"), ("M003", "sur")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _evaluation_block(start: float, name: str, code: str) -> str:
    # the real file: a summary line, then each evaluator's categorical (C-) and attribute (A-) lines, blank line
    return (f"[{start:.4f} - {start + 1.9456:.4f}]\t{name}\t{code}\t[2.5000, 2.5000, 2.5000]\n"
            "C-E2:\tNeutral;\t()\nC-E3:\tNeutral;\t()\nC-F1:\tNeutral;\t(curious)\n"
            "A-E3:\tval 3; act 2; dom  2;\t()\nA-F1:\tval 3; act 2; dom  1;\t()\n\n")


def make_iemocap(base: Path) -> Path:
    """A tiny tree in the real IEMOCAP_full_release layout (noise instead of speech)."""
    root = base / "IEMOCAP_full_release"
    for k in range(1, 6):
        session = root / f"Session{k}"
        for dialog in (f"Ses0{k}F_impro01", f"Ses0{k}M_script01_1"):
            text = HEADER
            for t, (suffix, code) in enumerate(TURNS):
                name = f"{dialog}_{suffix}"
                text += _evaluation_block(6.29 + 3 * t, name, code)
                write_noise_wav(session / "sentences" / "wav" / dialog / f"{name}.wav", 0.5 + 0.05 * t,
                                seed=100 * k + t, gain=0.05)
            eval_dir = session / "dialog" / "EmoEvaluation"
            eval_dir.mkdir(parents=True, exist_ok=True)
            (eval_dir / f"{dialog}.txt").write_text(text)
            # the per-evaluator folders and macOS resource-fork files of some copies must be ignored
            (eval_dir / "Categorical").mkdir(exist_ok=True)
            (eval_dir / "Categorical" / f"{dialog}_e1_cat.txt").write_text(f"{dialog}_F000 :Neutral state; ()\n")
            (eval_dir / f"._{dialog}.txt").write_bytes(b"\x00\x05\x16\x07binary")
    return root


def test_parse_real_iemocap_labels(tmp_path):
    root = make_iemocap(tmp_path)
    utts = er.prepare_real(root)
    assert len(utts) == 5 * 2 * 5  # 5 kept turns (neu, exc, ang, sad, hap) per dialog, 2 dialogs, 5 sessions
    assert Counter(u.labels["emotion"] for u in utts) == {"neu": 10, "hap": 20, "ang": 10, "sad": 10}
    first = next(u for u in utts if u.id == "Ses01M_script01_1_M000")
    assert first.path == "Session1/sentences/wav/Ses01M_script01_1/Ses01M_script01_1_M000.wav"
    assert first.labels == {"emotion": "hap", "fold": 1, "session": 1}  # exc merged into hap
    assert first.speaker == "Ses01M" and first.duration_s == pytest.approx(0.55)


def test_leave_one_session_out_folds_with_seeded_dev(tmp_path):
    utts = er.prepare_real(make_iemocap(tmp_path))
    for fold in er.FOLDS:
        splits = er.split_fold(utts, fold)
        assert {u.labels["session"] for u in splits["test"]} == {fold}
        assert all(u.labels["session"] != fold for s in ("train", "dev") for u in splits[s])
        assert len(splits["dev"]) == round(0.2 * 40) and len(splits["train"]) == 32
        ids = [u.id for s in splits.values() for u in s]
        assert len(ids) == len(set(ids)) == len(utts)
        assert all(u.split == s for s, us in splits.items() for u in us)
    again = er.split_fold(list(reversed(utts)), 2)
    assert {u.id for u in again["dev"]} == {u.id for u in er.split_fold(utts, 2)["dev"]}  # order-independent
    assert {u.id for u in er.split_fold(utts, 2, dev_seed=1)["dev"]} != {u.id for u in again["dev"]}
    with pytest.raises(DataError, match="ER fold must be one of 1, 2, 3, 4, 5, got 6"):
        er.split_fold(utts, 6)


def test_wrong_layouts_give_one_line_errors(tmp_path):
    root = make_iemocap(tmp_path)
    (root / "Session3").rename(root / "session3")
    with pytest.raises(DataError, match=r"Session3: expected the folder Session3/ of the IEMOCAP_full_release "
                                        r"layout, not found; found in .*: Session1, Session2, Session4, Session5, "
                                        r"session3"):
        er.prepare_real(root)
    (root / "session3").rename(root / "Session3")
    (root / "Session2" / "dialog" / "EmoEvaluation").rename(root / "Session2" / "dialog" / "labels")
    with pytest.raises(DataError, match=r"Session2/dialog/EmoEvaluation: expected the label folder "
                                        r"dialog/EmoEvaluation/ .* found in .*: labels"):
        er.prepare_real(root)
    (root / "Session2" / "dialog" / "labels").rename(root / "Session2" / "dialog" / "EmoEvaluation")
    (root / "Session4" / "sentences" / "wav" / "Ses04F_impro01" / "Ses04F_impro01_F001.wav").unlink()
    with pytest.raises(DataError, match=r"Ses04F_impro01_F001.wav: audio file not found \(listed in "
                                        r".*EmoEvaluation/Ses04F_impro01.txt\)") as err:
        er.prepare_real(root)
    assert "\n" not in str(err.value)
    for txt in (root / "Session5" / "dialog" / "EmoEvaluation").glob("Ses*.txt"):
        txt.write_text(txt.read_text().replace("\t", "  ").replace("[", "(").replace("]", ")"))
    with pytest.raises(DataError, match=r"Session5/dialog/EmoEvaluation: no summary lines like"):
        er.read_session(root, 5)


def test_fold_means_average_the_selected_rows_per_seed():
    def row(fold, seed, value, selected=True):
        return {"task": "er", "fold": fold, "seed": seed, "value": value, "selected": selected,
                "metric": "accuracy", "unit": "%", "data": {"corpus": "synth"}}

    rows = [row(1, 0, 50.0), row(2, 0, 60.0), row(3, 0, 40.0), row(4, 0, 70.0), row(5, 0, 30.0),
            row(1, 0, 99.0, selected=False),  # a learning rate that lost on dev does not count
            row(1, 1, 20.0), row(2, 1, 30.0)]
    (seed0, seed1) = fold_means(rows)
    assert seed0["folds"] == [1, 2, 3, 4, 5] and seed0["value"] == pytest.approx(50.0)
    assert seed1["seed"] == 1 and seed1["folds"] == [1, 2] and seed1["value"] == pytest.approx(25.0)
    assert fold_means([row(3, 0, 10.0)]) == []  # --fold K: a single fold has no mean to report
    assert fold_means([{**row(None, 0, 10.0), "task": "ks"}]) == []


def test_five_fold_run_on_the_real_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPEECHBENCH_THREADS", "1")
    root = make_iemocap(tmp_path)
    assert main(["run", "--upstream", "fbank_no_cmvn", "--task", "er", "--data-root", str(root), "--out",
                 str(tmp_path / "out"), "train.max_steps=4", "train.eval_every=2", "train.batch_size=8"]) == 0
    out = capsys.readouterr().out
    runs = sorted((tmp_path / "out" / "fbank_no_cmvn" / "er").iterdir())
    assert [r.name.split("-")[2] for r in runs] == [f"fold{k}" for k in er.FOLDS]
    rows = [json.loads((r / "result.json").read_text()) for r in runs]
    assert [r["fold"] for r in rows] == [1, 2, 3, 4, 5] and all(r["recipe"]["name"] == "superb/er" for r in rows)
    mean = sum(r["value"] for r in rows) / 5
    assert f"= er mean over folds 1,2,3,4,5 seed=0: test accuracy = {mean:.2f} %" in out
    test_ids = {r["fold"]: {u.id for u in read_manifest(run / "manifests" / "test.jsonl")} for r, run in
                zip(rows, runs, strict=True)}
    assert all(i.startswith(f"Ses0{k}") for k, ids in test_ids.items() for i in ids)
    # --fold K runs one fold (already done here: reused, not retrained)
    (row,) = run(RunRequest(upstream="fbank_no_cmvn", task="er", data_root=str(root), fold=3,
                            out_dir=str(tmp_path / "out"),
                            overrides=("train.max_steps=4", "train.eval_every=2", "train.batch_size=8")))
    assert row["fold"] == 3 and row["run_id"] == runs[2].name


def test_synthetic_folds_are_speaker_disjoint(tmp_path, synth_tiny):
    utts = read_manifest(synth_tiny / "er" / "utterances.jsonl")
    splits = er.split_fold(utts, 4)
    assert {u.labels["fold"] for u in splits["test"]} == {4}
    train_speakers = {u.speaker for s in ("train", "dev") for u in splits[s]}
    assert not train_speakers & {u.speaker for u in splits["test"]}
    (row,) = run(RunRequest(upstream="fbank_no_cmvn", task="er", fold=4, out_dir=str(tmp_path),
                            overrides=("data.profile=tiny", "train.max_steps=10", "train.eval_every=5")))
    assert row["fold"] == 4 and row["data"]["corpus"] == "synth" and row["features"].startswith("pooled")
