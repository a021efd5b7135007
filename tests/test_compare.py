"""`bench compare`: paired tests per task, Holm over tasks, verdicts, and refusals (different items, folds, files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import correct_records, error_line, write_run

from speechbench.benchmark.cli import main
from speechbench.leaderboard.compare import CompareError, compare
from speechbench.leaderboard.stats import holm


def edit_records(edits, lengths) -> list[dict]:
    return [{"id": f"utt{i:04d}", "edits": int(e), "ref_len": int(n)}
            for i, (e, n) in enumerate(zip(edits, lengths, strict=True))]


@pytest.fixture
def results(tmp_path):
    """good vs bad: KS 90 % vs 60 % (clearly different), SID the same outcomes (no difference), ASR 5 % vs 15 % WER
    (lower is better: good wins), ASV identical scores."""
    rng = np.random.default_rng(0)
    root = tmp_path / "results"
    write_run(root, "good", "ks", correct_records(rng.random(300) < 0.9))
    write_run(root, "bad", "ks", correct_records(rng.random(300) < 0.6))
    sid = correct_records(rng.random(200) < 0.7)
    write_run(root, "good", "sid", sid)
    write_run(root, "bad", "sid", sid)
    lengths = rng.integers(5, 20, 150)
    write_run(root, "good", "asr", edit_records(rng.binomial(lengths, 0.05), lengths))
    write_run(root, "bad", "asr", edit_records(rng.binomial(lengths, 0.15), lengths))
    trials = [{"id": f"t{k}", "label": k % 2, "score": float(k % 2 + rng.normal()), "enroll_speaker": f"s{k % 7}",
               "test_speaker": f"s{(k // 2) % 7}"} for k in range(140)]
    write_run(root, "good", "asv", trials)
    write_run(root, "bad", "asv", trials)
    return root


def test_verdicts_follow_direction_and_holm(results):
    by_column = {c.column: c for c in compare(["good", "bad"], results, resamples=500)}
    assert sorted(by_column) == ["ASR_wer", "ASV_eer", "KS_acc", "SID_acc"]
    ks, sid, asr, asv = (by_column[c] for c in ("KS_acc", "SID_acc", "ASR_wer", "ASV_eer"))
    assert ks.verdict == "good better" and ks.difference > 20
    assert ks.difference == pytest.approx(ks.value_a - ks.value_b)
    assert asr.verdict == "good better" and asr.difference < 0 and not asr.higher_is_better
    assert sid.verdict == asv.verdict == "no significant difference"
    assert sid.difference == 0.0 and sid.p_bootstrap == 1.0 and sid.discordant == (0, 0)
    # McNemar only for accuracy; Holm over all four bootstrap p-values
    assert ks.p_mcnemar is not None and ks.p_mcnemar < 1e-6 and asr.p_mcnemar is None and asv.p_mcnemar is None
    tests = list(by_column.values())
    assert [t.p_holm for t in tests] == pytest.approx(holm([t.p_bootstrap for t in tests]))
    for t in tests:  # a significant verdict always comes with an interval that excludes 0
        if t.verdict != "no significant difference":
            assert t.ci_lo > 0 or t.ci_hi < 0
        assert t.ci_lo <= t.difference <= t.ci_hi
    assert ks.items == 300 and asv.items == 140


def test_cli_prints_a_table_and_json(results, capsys):
    assert main(["compare", "good", "bad", "--results", str(results), "--resamples", "300", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["metric", "corpus"]
    ks_line = next(line for line in lines if line.startswith("KS_acc"))
    assert "synth/small" in ks_line and ks_line.rstrip().endswith("good better")
    assert "4 paired test(s): 300 paired bootstrap resamples" in out and "Holm's correction over all 4 tests" in out
    assert "not SUPERB numbers" in out
    assert main(["compare", "good", "bad", "--results", str(results), "--resamples", "300", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert {r["column"]: r["verdict"] for r in records}["KS_acc"] == "good better"
    assert {"difference", "ci_lo", "ci_hi", "p_bootstrap", "p_mcnemar", "p_holm", "items"} <= set(records[0])


def test_directories_as_arguments(results):
    by_dir = compare([str(results / "good"), str(results / "bad")], resamples=200)
    by_name = compare(["good", "bad"], results, resamples=200)
    assert [(c.column, c.p_bootstrap, c.ci_lo) for c in by_dir] == [(c.column, c.p_bootstrap, c.ci_lo)
                                                                      for c in by_name]
    assert by_dir[0].a == str(results / "good")
    with pytest.raises(CompareError, match="holds results of several upstreams"):
        compare([str(results), "good"], results)


def test_three_upstreams_first_against_each_other(results):
    write_run(results, "third", "ks", correct_records(np.random.default_rng(9).random(300) < 0.6))
    tests = compare(["good", "bad", "third"], results, resamples=200)
    assert [(t.b, t.column) for t in tests] == [("bad", "ASR_wer"), ("bad", "ASV_eer"), ("bad", "KS_acc"),
                                                ("bad", "SID_acc"), ("third", "KS_acc")]
    assert [t.p_holm for t in tests] == pytest.approx(holm([t.p_bootstrap for t in tests]))


def test_refuses_runs_on_different_test_items(results, capsys):
    write_run(results, "other", "ks", correct_records(np.ones(300), prefix="clip"))
    with pytest.raises(CompareError, match="test items differ"):
        compare(["good", "other"], results)
    assert main(["compare", "good", "other", "--results", str(results)]) == 2
    err = error_line(capsys.readouterr().err)
    assert "cannot pair good and other on KS_acc (synth/small)" in err
    assert "300 vs 300 test items, 300 + 300 not shared" in err


def test_refuses_unknown_names_no_common_task_and_missing_items(results, tmp_path):
    with pytest.raises(CompareError, match=r"no results for upstream 'nope' under .*upstreams there: bad, good"):
        compare(["good", "nope"], results)
    write_run(results, "ks_only_on_tiny", "ks", correct_records(np.ones(300)), profile="tiny")
    with pytest.raises(CompareError, match="no task in common on the same corpus"):
        compare(["good", "ks_only_on_tiny"], results)
    path = write_run(results, "no_items", "sid", correct_records(np.ones(200)))
    path.with_name("items.jsonl").unlink()
    with pytest.raises(CompareError, match="no per-item scores"):
        compare(["good", "no_items"], results)
    with pytest.raises(CompareError, match="at least two"):
        compare(["good"], results)


def test_folds_are_paired_within_folds(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "results"
    for fold in (1, 2):
        write_run(root, "a", "er", correct_records(rng.random(80) < 0.8, prefix=f"f{fold}-"), fold=fold)
        write_run(root, "b", "er", correct_records(rng.random(80) < 0.5, prefix=f"f{fold}-"), fold=fold)
    (er,) = compare(["a", "b"], root, resamples=300)
    assert er.column == "ER_acc" and er.items == 160 and er.verdict == "a better"
    n_ab, n_ba = er.discordant  # McNemar pooled over both folds' items
    assert 0 < n_ba < n_ab <= 160
    write_run(root, "c", "er", correct_records(np.ones(80), prefix="f1-"), fold=1)
    with pytest.raises(CompareError, match=r"different folds \(\[1, 2\] vs \[1\]\)"):
        compare(["a", "c"], root)
