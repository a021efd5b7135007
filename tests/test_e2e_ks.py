"""`bench run` end to end on the tiny synthetic corpus: result files, the FBANK floor, the leaderboard."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from helpers import error_line

from speechbench.benchmark.cli import main
from speechbench.downstreams.data import read_manifest

TINY = ["data.profile=tiny", "train.max_steps=40", "train.eval_every=20", "optim.lr=1e-2"]
RESULT_FIELDS = {"schema_version", "upstream", "task", "recipe", "data", "split", "fold", "metric", "value", "unit",
                 "higher_is_better", "learning_rate", "seed", "selected", "layer_weights", "best_step",
                 "wall_time_s", "git_sha", "timestamp", "run_id", "features", "items", "cost", "protocol"}


def _results(out: Path, upstream: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / upstream).rglob("result.json"))]


def test_run_writes_result_and_resolved_config(tmp_path, synth_tiny, capsys):
    assert main(["run", "--upstream", "fbank_no_cmvn", "--task", "ks", "--out", str(tmp_path), *TINY]) == 0
    captured = capsys.readouterr()
    assert "recipe synth/ks" in captured.err and "synthetic corpus" in captured.err  # logs: stderr
    assert captured.out.startswith("* ks lr=") and "test accuracy" in captured.out  # results: stdout only
    assert "recipe" not in captured.out
    (result,) = _results(tmp_path, "fbank_no_cmvn")
    assert RESULT_FIELDS <= set(result)
    assert result["upstream"]["name"] == "fbank_no_cmvn" and result["upstream"]["num_layers"] == 1
    assert result["data"]["corpus"] == "synth" and result["metric"] == "accuracy" and result["unit"] == "%"
    assert 0.0 <= result["value"] <= 100.0 and len(result["recipe"]["config_sha256"]) == 64
    run_dir = next((tmp_path / "fbank_no_cmvn" / "ks").iterdir())
    for name in ("config.yaml", "log.txt", "predictions.tsv", "manifests/train.jsonl", "checkpoints/best.pt"):
        assert (run_dir / name).exists(), name
    # per-item outcomes: one line per test utterance, in manifest order, reproducing the accuracy
    items = [json.loads(line) for line in (run_dir / "items.jsonl").read_text().splitlines()]
    test_ids = [u.id for u in read_manifest(run_dir / "manifests" / "test.jsonl")]
    assert [i["id"] for i in items] == test_ids and result["items"]["count"] == len(test_ids)
    assert 100.0 * sum(i["correct"] for i in items) / len(items) == pytest.approx(result["value"])
    assert result["items"]["file"] == "items.jsonl" and len(result["items"]["ids_sha256"]) == 64
    # measured cost: fbank_no_cmvn has no parameters, but its filterbank matrix product is counted
    cost = result["cost"]
    assert cost["params"] == 0 and cost["gflops_per_audio_s"] > 0 and cost["rtf"] > 0
    assert (cost["device"], cost["precision"], cost["input_s"]) == ("cpu", "fp32", 10.0)
    # a second identical command reuses the finished run instead of training again
    assert main(["run", "--upstream", "fbank_no_cmvn", "--task", "ks", "--out", str(tmp_path), *TINY]) == 0
    assert "already done" in capsys.readouterr().err and len(_results(tmp_path, "fbank_no_cmvn")) == 1


def _predictions(out: Path, upstream: str) -> set[str]:
    run_dir = next((out / upstream / "ks").iterdir())
    return {line.split("\t")[1] for line in (run_dir / "predictions.tsv").read_text().splitlines()}


def test_fbank_scores_one_class_test_share_and_leaderboard_holds_both(tmp_path, synth_tiny, capsys):
    for upstream in ("fbank", "fbank_no_cmvn"):
        assert main(["run", "--upstream", upstream, "--task", "ks", "--out", str(tmp_path), *TINY]) == 0
    (fbank,) = _results(tmp_path, "fbank")
    assert fbank["protocol"]["sampling"] == "class_balanced"  # the synth recipe samples as SUPERB does
    train = [u.labels["keyword"] for u in read_manifest(synth_tiny / "ks" / "train.jsonl")]
    test = [u.labels["keyword"] for u in read_manifest(synth_tiny / "ks" / "test.jsonl")]
    (predicted,) = _predictions(tmp_path, "fbank")  # every clip gets the same pooled input, so the same prediction
    assert fbank["value"] == pytest.approx(100.0 * test.count(predicted) / len(test))
    assert main(["leaderboard", str(tmp_path), "--out", str(tmp_path / "lb.csv")]) == 0
    text = capsys.readouterr().out
    assert "fbank_no_cmvn" in text and "synth" in text
    wide = pd.read_csv(tmp_path / "lb.csv")
    assert set(wide["upstream"]) == {"fbank", "fbank_no_cmvn"} and set(wide["corpus"]) == {"synth"}
    row = wide.set_index("upstream").loc["fbank"]
    assert row["KS_acc"] == pytest.approx(fbank["value"])
    assert row["KS_acc_lo"] <= row["KS_acc"] <= row["KS_acc_hi"]  # bootstrap interval from items.jsonl
    assert row["params_m"] == 0.0 and row["gflops_per_audio_s"] > 0
    assert len(pd.read_csv(tmp_path / "lb.long.csv")) == 2
    # with uniform sampling the one prediction is the training set's majority class
    (majority, _), (_, runner_up) = Counter(train).most_common(2)
    assert Counter(train)[majority] > runner_up  # a strict majority, so the floor is well defined
    uniform = tmp_path / "uniform"
    assert main(["run", "--upstream", "fbank", "--task", "ks", "--out", str(uniform), *TINY,
                 "task_options.sampling=uniform"]) == 0
    assert _predictions(uniform, "fbank") == {majority}
    (result,) = _results(uniform, "fbank")
    assert result["value"] == pytest.approx(100.0 * test.count(majority) / len(test))
    assert any(d.startswith("uniform sampling") for d in result["protocol"]["deviations"])


def test_learning_rate_search_selects_best_on_dev(tmp_path, synth_tiny):
    assert main(["run", "--upstream", "fbank_no_cmvn", "--task", "ks", "--out", str(tmp_path), "--lr", "1e-1,1e-4",
                 *TINY[:-1]]) == 0
    rows = _results(tmp_path, "fbank_no_cmvn")
    assert sorted(r["learning_rate"] for r in rows) == [1e-4, 1e-1]
    (selected,) = [r for r in rows if r["selected"]]
    assert selected["extra_metrics"]["dev_accuracy"] == max(r["extra_metrics"]["dev_accuracy"] for r in rows)


def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    assert main(["run", "--upstream", "nope", "--task", "ks", "--out", str(tmp_path)]) == 2
    err = error_line(capsys.readouterr().err)
    assert "'nope'" in err and "fbank_no_cmvn" in err
    assert main(["run", "--upstream", "fbank", "--task", "ks", "--out", str(tmp_path), "optim.nope=1"]) == 2
    assert "unknown key(s) ['nope']; valid keys: name, lr" in capsys.readouterr().err
    assert main(["run", "--upstream", "fbank", "--task", "ks", "--data-root", str(tmp_path / "sc")]) == 2
    assert "expected the corpus folder of the speech_commands_v0.01 layout" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_accuracy(tmp_path, synth_tiny):
    """SIGKILL a real `bench run` after its first checkpoint; the rerun resumes and matches an uninterrupted run."""
    args = ["run", "--upstream", "fbank_no_cmvn", "--task", "ks", "data.profile=tiny", "train.max_steps=2000",
            "train.eval_every=100", "optim.lr=1e-2"]
    env = dict(os.environ, SPEECHBENCH_THREADS="1")
    cmd = [sys.executable, "-m", "speechbench"]
    subprocess.run([*cmd, *args, "--out", str(tmp_path / "full")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cmd, *args, "--out", str(tmp_path / "cut")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "cut").rglob("last.pt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "cut").rglob("result.json")), "the run finished before it could be killed"
    done = subprocess.run([*cmd, *args, "--out", str(tmp_path / "cut")], check=True, env=env, capture_output=True,
                          text=True)
    assert "resumed from" in done.stderr
    (full,) = _results(tmp_path / "full", "fbank_no_cmvn")
    (cut,) = _results(tmp_path / "cut", "fbank_no_cmvn")
    assert (cut["value"], cut["best_step"]) == (full["value"], full["best_step"])
    assert cut["layer_weights"] == full["layer_weights"]
