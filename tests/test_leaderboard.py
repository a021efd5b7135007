"""The leaderboard: result.json trees -> long table -> wide table, SUPERB score, CSV files and text."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from speechbench.common import UnknownNameError
from speechbench.leaderboard.build import build_leaderboard, long_csv_path
from speechbench.leaderboard.collect import NoResultsError, collect_results
from speechbench.leaderboard.references import load_reference, reference_from_table
from speechbench.leaderboard.tables import SYNTH_FOOTER, format_table, read_wide_csv, units_path, wide_table

ROOT = Path(__file__).resolve().parents[1]

METRICS = {  # task -> (metric, higher_is_better)
    "pr": ("per", False), "ks": ("accuracy", True), "ic": ("accuracy", True), "sid": ("accuracy", True),
    "er": ("accuracy", True), "asr": ("wer", False), "asv": ("eer", False),
}
COLUMNS = {"pr": "PR_per", "ks": "KS_acc", "ic": "IC_acc", "sid": "SID_acc", "er": "ER_acc", "asr": "ASR_wer",
           "asv": "ASV_eer"}


def write_result(root: Path, name: str, *, upstream: str = "hubert", task: str = "ks", value: float = 50.0,
                 corpus: str = "synth", profile: str | None = "small", fold: int | None = None, seed: int = 0,
                 lr: float = 1e-3, selected: bool = True, timestamp: str = "2026-11-22T04:00:00+00:00",
                 deviations: tuple[str, ...] | None = None, **extra) -> Path:
    """A result.json; its protocol fingerprint is SUPERB-faithful on a real corpus unless ``deviations`` are given."""
    metric, higher = METRICS.get(task, ("accuracy", True))
    if deviations is None:
        deviations = ("synthetic corpus",) if corpus == "synth" else ()
    result = {
        "schema_version": 3,
        "protocol": {"recipe": f"superb/{task}", "reproduces": "superb", "superb_faithful": not deviations,
                     "deviations": list(deviations), "folds": 5 if fold is not None else None},
        "upstream": {"name": upstream, "checkpoint_sha256": None, "format": "builtin", "num_layers": 13,
                     "hidden_size": 768, "versions": {"speechbench": "0.1.0"}},
        "task": task, "recipe": {"name": f"synth/{task}", "config_sha256": "ab12"},
        "data": {"corpus": corpus, "profile": profile, "root": "/data"},
        "split": "test", "fold": fold, "metric": metric, "value": value, "unit": "%", "higher_is_better": higher,
        "extra_metrics": {}, "learning_rate": lr, "seed": seed, "selected": selected, "layer_weights": [1.0],
        "layer": None, "best_step": 10, "steps": 20, "wall_time_s": 1.5, "git_sha": "abc", "timestamp": timestamp,
        "run_id": name,
    }
    result.update(extra)
    path = root / name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(result))
    return path


def one_row(wide: pd.DataFrame, upstream: str, corpus: str = "synth") -> pd.Series:
    rows = wide[(wide["upstream"] == upstream) & (wide["corpus"] == corpus)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


# A tiny reference: FBANK row, a SOTA that is best on some tasks, and another row that is best on the rest.
FAKE_REF = pd.DataFrame([
    {"upstream": "fbank", "PR_per": 80.0, "KS_acc": 10.0, "IC_acc": 10.0, "SID_acc": 0.0, "ER_acc": 40.0,
     "ASR_wer": 25.0, "ASV_eer": 10.0},
    {"upstream": "big", "PR_per": 5.0, "KS_acc": 90.0, "IC_acc": 95.0, "SID_acc": 80.0, "ER_acc": 60.0,
     "ASR_wer": 5.0, "ASV_eer": 6.0},
    {"upstream": "other", "PR_per": 4.0, "KS_acc": 96.0, "IC_acc": 90.0, "SID_acc": 70.0, "ER_acc": 50.0,
     "ASR_wer": 7.0, "ASV_eer": 5.0},
])
FAKE_SOTA = {"PR_per": 4.0, "KS_acc": 96.0, "IC_acc": 95.0, "SID_acc": 80.0, "ER_acc": 60.0, "ASR_wer": 5.0,
             "ASV_eer": 5.0}


def fake_reference():
    return reference_from_table(FAKE_REF, name="fake_2026", date="2026-01-01", baseline="fbank")


def test_collect_long_table(tmp_path):
    write_result(tmp_path, "a", task="ks", value=87.5)
    write_result(tmp_path, "deep/b", task="asr", value=12.0)
    long = collect_results(tmp_path)
    assert len(long) == 2
    for col in ("upstream", "task", "metric", "value", "unit", "higher_is_better", "corpus", "profile", "split",
                "fold", "learning_rate", "seed", "selected", "recipe", "config_sha256", "best_step", "wall_time_s",
                "timestamp", "run_id", "path", "checkpoint_sha256"):
        assert col in long.columns
    asr = long[long["task"] == "asr"].iloc[0]
    assert asr["column"] == "ASR_wer" and asr["value"] == 12.0 and not asr["higher_is_better"]
    assert asr["path"].endswith("deep/b/result.json")


def test_wide_table_shape_and_values(tmp_path):
    for task, value in [("ks", 90.0), ("ic", 80.0), ("pr", 20.0)]:
        write_result(tmp_path, f"hubert-{task}", task=task, value=value)
    write_result(tmp_path, "apc-ks", upstream="apc", task="ks", value=70.0)
    wide = wide_table(collect_results(tmp_path), reference=None)
    assert len(wide) == 2
    assert [c for c in wide.columns if c[:2] in ("PR", "KS", "IC")] == ["PR_per", "KS_acc", "IC_acc"]
    hubert, apc = one_row(wide, "hubert"), one_row(wide, "apc")
    assert (hubert["KS_acc"], hubert["IC_acc"], hubert["PR_per"]) == (90.0, 80.0, 20.0)
    assert apc["KS_acc"] == 70.0 and pd.isna(apc["IC_acc"])
    assert wide.attrs["units"]["KS_acc"] == "% higher" and wide.attrs["units"]["PR_per"] == "% lower"


def test_unknown_task_gets_generic_column(tmp_path):
    write_result(tmp_path, "sd", task="sd", metric="der", higher_is_better=False, value=9.0)
    wide = wide_table(collect_results(tmp_path), reference=None)
    assert one_row(wide, "hubert")["sd_der"] == 9.0
    assert wide.attrs["units"]["sd_der"] == "% lower"


def test_sweep_only_selected_rows_count(tmp_path):
    write_result(tmp_path, "lr1", lr=1e-2, value=60.0, selected=False)
    write_result(tmp_path, "lr2", lr=1e-3, value=85.0, selected=True)
    write_result(tmp_path, "lr3", lr=1e-4, value=99.0, selected=False)  # better on test, but not on dev
    long = collect_results(tmp_path)
    assert len(long) == 3
    assert one_row(wide_table(long, reference=None), "hubert")["KS_acc"] == 85.0


def test_newest_duplicate_wins(tmp_path):
    write_result(tmp_path, "old", value=50.0, timestamp="2026-11-20T10:00:00+00:00")
    write_result(tmp_path, "new", value=70.0, timestamp="2026-11-21T09:00:00+01:00")
    write_result(tmp_path, "older", value=30.0, timestamp="2026-11-19T10:00:00+00:00")
    assert one_row(wide_table(collect_results(tmp_path), reference=None), "hubert")["KS_acc"] == 70.0


def test_er_fold_mean_and_seed_mean(tmp_path):
    fold_values = [60.0, 62.0, 64.0, 66.0, 73.0]  # mean 65.0
    for fold, value in enumerate(fold_values, start=1):
        write_result(tmp_path, f"er-f{fold}", task="er", fold=fold, value=value)
    # a stale rerun of fold 1 must not count, the newest one does
    write_result(tmp_path, "er-f1-old", task="er", fold=1, value=10.0, timestamp="2026-01-01T00:00:00+00:00")
    long = collect_results(tmp_path)
    assert sorted(long.loc[long["task"] == "er", "fold"].tolist()) == [1, 1, 2, 3, 4, 5]
    row = one_row(wide_table(long, reference=None), "hubert")
    assert row["ER_acc"] == pytest.approx(65.0)
    assert row["ER_acc_folds"] == 5
    assert "ER_acc_seeds" not in row.index

    for seed, value in [(1, 80.0), (2, 90.0)]:
        write_result(tmp_path, f"ks-s{seed}", task="ks", seed=seed, value=value)
    write_result(tmp_path, "ks-s0", task="ks", seed=0, value=70.0)
    row = one_row(wide_table(collect_results(tmp_path), reference=None), "hubert")
    assert row["KS_acc"] == pytest.approx(80.0) and row["KS_acc_seeds"] == 3
    assert "KS_acc_folds" not in row.index


def test_synth_labelled_and_footer(tmp_path):
    write_result(tmp_path, "synth", value=87.5, corpus="synth", profile="small")
    write_result(tmp_path, "tiny", value=40.0, corpus="synth", profile="tiny")
    write_result(tmp_path, "real", value=96.0, corpus="speech_commands_v0.01", profile=None)
    wide = wide_table(collect_results(tmp_path), reference=None)
    assert sorted(zip(wide["corpus"], wide["profile"], wide["KS_acc"], strict=True)) == [
        ("real", "", 96.0), ("synth", "small", 87.5), ("synth", "tiny", 40.0)]
    text = format_table(wide)
    assert text.splitlines()[-1] == SYNTH_FOOTER
    assert "87.50" in text and "% higher" in text

    real_only = wide[wide["corpus"] == "real"]
    assert SYNTH_FOOTER not in format_table(real_only)


def test_superb_score_hand_computed(tmp_path):
    ref = fake_reference()
    fbank = FAKE_REF.set_index("upstream").loc["fbank"]
    for task, col in COLUMNS.items():
        base, sota = fbank[col], FAKE_SOTA[col]
        write_result(tmp_path, f"zero-{task}", upstream="zero", task=task, value=base, corpus="real_corpus")
        write_result(tmp_path, f"top-{task}", upstream="top", task=task, value=sota, corpus="real_corpus")
        write_result(tmp_path, f"half-{task}", upstream="half", task=task, value=(base + sota) / 2,
                     corpus="real_corpus")
        write_result(tmp_path, f"synth-{task}", upstream="top", task=task, value=sota, corpus="synth")
        if task != "asv":
            write_result(tmp_path, f"partial-{task}", upstream="partial", task=task, value=sota, corpus="real_corpus")
    wide = wide_table(collect_results(tmp_path), reference=ref)
    assert one_row(wide, "zero", "real")["SUPERB_score"] == pytest.approx(0.0)
    assert one_row(wide, "top", "real")["SUPERB_score"] == pytest.approx(1000.0)
    assert one_row(wide, "half", "real")["SUPERB_score"] == pytest.approx(500.0)
    assert one_row(wide, "top", "real")["SUPERB_reference"] == "fake_2026"
    assert pd.isna(one_row(wide, "top", "synth")["SUPERB_score"])  # synthetic numbers are never scored
    assert pd.isna(one_row(wide, "partial", "real")["SUPERB_score"])  # needs all seven tasks
    assert "fake_2026" in format_table(wide)


def test_superb_score_mixed_tasks_hand_computed(tmp_path):
    # best on KS (1.0) and worst on the rest (0.0): 1000 * 1 / 7
    fbank = FAKE_REF.set_index("upstream").loc["fbank"]
    for task, col in COLUMNS.items():
        value = FAKE_SOTA[col] if task == "ks" else fbank[col]
        write_result(tmp_path, task, task=task, value=value, corpus="real_corpus")
    wide = wide_table(collect_results(tmp_path), reference=fake_reference())
    assert one_row(wide, "hubert", "real")["SUPERB_score"] == pytest.approx(1000 / 7)


def test_shipped_reference_set():
    ref = load_reference("superb_paper_2021")
    assert ref.name == "superb_paper_2021" and ref.date == "2021-05-03" and ref.baseline == "fbank"
    assert ref.metric_columns == ["PR_per", "KS_acc", "IC_acc", "SID_acc", "ER_acc", "ASR_wer", "ASV_eer"]
    assert ref.baseline_values()["KS_acc"] == 8.63
    best = ref.best_values()
    assert best["PR_per"] == 3.53 and best["KS_acc"] == 96.66 and best["ASV_eer"] == 5.11
    assert list(ref.table.reset_index().columns) == ["upstream", "params_m", "PR_per", "KS_acc", "IC_acc", "SID_acc",
                                                     "ER_acc", "ASR_wer", "ASV_eer", "checked", "source"]
    assert set(ref.table["checked"]) == {"no"}  # recalled values: none confirmed against the paper's table yet
    with pytest.raises(UnknownNameError, match="unknown reference set"):
        load_reference("nope")


def test_malformed_json_skipped_with_warning(tmp_path, caplog):
    write_result(tmp_path, "good", value=80.0)
    bad = tmp_path / "bad" / "result.json"
    bad.parent.mkdir()
    bad.write_text('{"schema_version": 1, "task": ')
    future = write_result(tmp_path, "future", value=1.0, schema_version=99)
    novalue = write_result(tmp_path, "novalue", value=None)
    with caplog.at_level(logging.WARNING, logger="leaderboard"):
        long = collect_results(tmp_path)
    assert long["run_id"].tolist() == ["good"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and all("\n" not in m for m in messages)
    assert any(str(bad) in m and "invalid JSON" in m for m in messages)
    assert any(str(future) in m and "schema_version" in m for m in messages)
    assert any(str(novalue) in m and "value" in m for m in messages)


def test_empty_dir_is_a_clear_error(tmp_path):
    with pytest.raises(NoResultsError, match=f"no result.json found under {tmp_path}"):
        collect_results(tmp_path)


def test_a_list_of_files_collects_exactly_those(tmp_path):
    """``bench sweep`` tabulates its own result files, not everything that shares their folder."""
    mine = [write_result(tmp_path, "a", upstream="apc"), write_result(tmp_path, "b", upstream="cpc")]
    write_result(tmp_path, "c", upstream="intruder")
    assert sorted(collect_results([str(p) for p in mine])["upstream"]) == ["apc", "cpc"]
    assert sorted(collect_results(tmp_path)["upstream"]) == ["apc", "cpc", "intruder"]
    wide, _, _ = build_leaderboard(mine, tmp_path / "lb.csv", reference=None)
    assert sorted(wide["upstream"]) == ["apc", "cpc"]
    with pytest.raises(NoResultsError, match="no result.json files given"):
        collect_results([])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(NoResultsError, match=r"no usable result.json among the given files \(1 found, all skipped\)"):
        collect_results([tmp_path / "bad.json"])


def test_build_writes_both_csvs_and_reads_back(tmp_path):
    results = tmp_path / "results"
    for fold, value in enumerate([60.0, 70.0], start=1):
        write_result(results, f"er{fold}", task="er", fold=fold, value=value)
    write_result(results, "ks", value=87.5)
    write_result(results, "ks-unselected", value=10.0, selected=False)
    out = tmp_path / "out" / "lb.csv"
    wide, long, text = build_leaderboard(results, out)
    assert out.exists() and long_csv_path(out) == tmp_path / "out" / "lb.long.csv"
    assert sorted(p.name for p in out.parent.iterdir()) == ["lb.csv", "lb.long.csv", "lb.units.json"]  # no temps

    lines = out.read_text().splitlines()
    assert lines[0].startswith("upstream,corpus,profile,KS_acc,KS_acc_lo,KS_acc_hi,ER_acc,ER_acc_lo,ER_acc_hi,"
                               "ER_acc_folds")
    assert len(lines) == 2  # header and one row: no unit row in the data
    assert json.loads(units_path(out).read_text())["ER_acc_folds"] == "count"
    back = read_wide_csv(out)
    assert back.loc[0, "KS_acc"] == 87.5 and back.loc[0, "ER_acc"] == 65.0 and back.loc[0, "ER_acc_folds"] == 2
    assert back.attrs["units"]["ER_acc"] == "% higher" and back.attrs["units"]["KS_acc_lo"] == "% higher"
    plain = pd.read_csv(out)  # a plain read gives numbers
    assert plain["KS_acc"].dtype == float and plain["ER_acc_folds"].dtype == "int64"
    assert plain["KS_acc_lo"].isna().all()  # these fake results have no items.jsonl: no interval

    long_back = pd.read_csv(long_csv_path(out))
    assert len(long_back) == len(long) == 4
    assert long_back["counted"].sum() == 3
    assert SYNTH_FOOTER in text and "ER_acc_folds" in text


def test_leaderboard_does_not_import_torch():
    code = "import leaderboard.build, leaderboard.tables, sys; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_nothing_selected_gives_empty_table(tmp_path):
    write_result(tmp_path, "a", selected=False)
    wide = wide_table(collect_results(tmp_path), reference=None)
    assert wide.empty and "empty leaderboard" in format_table(wide)


def test_units_that_disagree_are_an_error(tmp_path):
    write_result(tmp_path, "pct", value=50.0)
    write_result(tmp_path, "frac", value=0.5, unit="fraction", seed=1)
    with pytest.raises(ValueError, match="KS_acc disagree on unit"):
        wide_table(collect_results(tmp_path), reference=None)


def test_superb_score_counts_only_results_whose_protocol_matches(tmp_path):
    fbank = FAKE_REF.set_index("upstream").loc["fbank"]
    dev_trials = "checkpoint chosen on dev trials of 40 held-out development speakers"
    for task, col in COLUMNS.items():
        sota = FAKE_SOTA[col]
        write_result(tmp_path, f"good-{task}", upstream="good", task=task, value=sota, corpus="real_corpus")
        write_result(tmp_path, f"dev-{task}", upstream="devsel", task=task, value=sota, corpus="real_corpus",
                     deviations=(dev_trials, "override train.max_steps=10 (recipe superb/asv: 200000)")
                     if task == "asv" else ())
        old = write_result(tmp_path, f"old-{task}", upstream="old", task=task, value=fbank[col], corpus="real_corpus",
                           schema_version=2)
        result = json.loads(old.read_text())
        del result["protocol"]
        old.write_text(json.dumps(result))
        if task != "er":
            write_result(tmp_path, f"folds-{task}", upstream="folds", task=task, value=sota, corpus="real_corpus")
    for fold in (1, 2, 3):
        write_result(tmp_path, f"folds-er-{fold}", upstream="folds", task="er", value=60.0, corpus="real_corpus",
                     fold=fold)
    long = collect_results(tmp_path)
    assert long.loc[long["upstream"] == "old", "superb_faithful"].isna().all()
    asv = long[(long["upstream"] == "devsel") & (long["task"] == "asv")].iloc[0]
    assert not asv["superb_faithful"] and asv["protocol_deviations"].startswith(dev_trials + " | override")
    wide = wide_table(long, reference=fake_reference())
    assert one_row(wide, "good", "real")["SUPERB_score"] == pytest.approx(1000.0)
    assert one_row(wide, "good", "real")["SUPERB_excluded"] == ""
    devsel = one_row(wide, "devsel", "real")
    assert pd.isna(devsel["SUPERB_score"]) and devsel["ASV_eer"] == FAKE_SOTA["ASV_eer"]  # shown, not scored
    assert devsel["SUPERB_excluded"] == f"ASV_eer: {dev_trials} (+1 more)"
    old = one_row(wide, "old", "real")
    assert pd.isna(old["SUPERB_score"])
    assert old["SUPERB_excluded"].startswith("PR_per: no protocol fingerprint (result schema 2); KS_acc: no protocol")
    assert one_row(wide, "folds", "real")["SUPERB_excluded"] == "ER_acc: 3 of 5 folds"
    text = format_table(wide)
    assert "SUPERB_score counts only results whose protocol fingerprint matches SUPERB's protocol" in text
    assert f"  devsel: ASV_eer: {dev_trials} (+1 more)" in text and "  folds: ER_acc: 3 of 5 folds" in text
    assert "SUPERB_excluded" not in text.splitlines()[0]  # a footer, not a table column
    build_leaderboard(tmp_path, tmp_path / "lb.csv", reference=fake_reference())
    back = read_wide_csv(tmp_path / "lb.csv")
    assert back.set_index("upstream").loc["devsel", "SUPERB_excluded"] == devsel["SUPERB_excluded"]


def test_reference_rows_not_yet_checked_are_listed(tmp_path):
    table = FAKE_REF.assign(checked=["true", "false", "yes"])
    ref = reference_from_table(table, name="fake_checked", date="2026-01-01", baseline="fbank")
    assert ref.unchecked_rows() == ["big"] and fake_reference().unchecked_rows() == []
    write_result(tmp_path, "a", task="ks", value=50.0, corpus="real_corpus")
    text = format_table(wide_table(collect_results(tmp_path), reference=ref))
    assert "reference values not yet checked against their source: big" in text
