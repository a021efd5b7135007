"""The leaderboard's interval and cost columns, the layer-weight figures, and the HTML/Markdown report (checked in a
real headless Chromium in the slow tier)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from helpers import correct_records, write_run

from speechbench.benchmark.cli import main
from speechbench.leaderboard.build import build_leaderboard
from speechbench.leaderboard.items import read_items
from speechbench.leaderboard.stats import bootstrap_interval
from speechbench.leaderboard.tables import format_table, units_path

COST = {"params": 2_500_000, "gflops_per_audio_s": 1.25, "rtf": 0.004, "device": "cpu", "precision": "fp32",
        "threads": 2, "machine": "Test CPU", "input_s": 10.0}


@pytest.fixture
def results(tmp_path):
    """Two upstreams on KS and SID (with items, layer weights and cost) and ER over two folds; one KS run of a third
    upstream has a stale items file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "results"
    for name, p, weights in (("strong", 0.9, [0.1, 0.2, 0.7]), ("weak", 0.6, [0.5, 0.3, 0.2])):
        write_run(root, name, "ks", correct_records(rng.random(200) < p), layer_weights=weights, cost=COST)
        write_run(root, name, "sid", correct_records(rng.random(100) < p - 0.1), layer_weights=weights[::-1],
                  cost=COST)
        for fold in (1, 2):
            write_run(root, name, "er", correct_records(rng.random(50) < p - 0.2, prefix=f"f{fold}-"), fold=fold,
                      layer_weights=weights)
    write_run(root, "stale", "ks", correct_records(np.ones(200)), value=42.0)
    return root


def test_interval_columns_match_the_bootstrap_of_the_items(results, tmp_path):
    wide, _, text = build_leaderboard(results, tmp_path / "lb.csv", resamples=300, seed=4)
    strong = wide.set_index("upstream").loc["strong"]
    ks_items = read_items(next((results / "strong" / "ks").iterdir()) / "result.json")
    assert (strong["KS_acc_lo"], strong["KS_acc_hi"]) == bootstrap_interval({(None, 0): ks_items}, 300, 4)
    assert strong["KS_acc_lo"] < strong["KS_acc"] < strong["KS_acc_hi"]
    assert strong["ER_acc_lo"] < strong["ER_acc"] < strong["ER_acc_hi"] and strong["ER_acc_folds"] == 2
    # the stale items file does not reproduce its run's value: no interval, and a note that says why
    stale = wide.set_index("upstream").loc["stale"]
    assert stale["KS_acc"] == 42.0 and pd.isna(stale["KS_acc_lo"])
    (note,) = wide.attrs["interval_notes"]
    assert note.startswith("stale KS_acc: no interval:") and "says 42" in note
    strong_line = next(line for line in text.splitlines() if line.startswith("strong "))
    assert f"{strong['KS_acc']:.2f} [{strong['KS_acc_lo']:.2f}, {strong['KS_acc_hi']:.2f}]" in strong_line
    assert "95% bootstrap interval over the test items (300 resamples, seed 4)" in text
    plain = pd.read_csv(tmp_path / "lb.csv")
    assert list(plain.columns[:6]) == ["upstream", "corpus", "profile", "KS_acc", "KS_acc_lo", "KS_acc_hi"]
    assert plain["KS_acc_lo"].dtype == float


def test_resamples_zero_leaves_intervals_out(results, tmp_path):
    wide, _, text = build_leaderboard(results, tmp_path / "lb.csv", resamples=0)
    assert not [c for c in wide.columns if c.endswith(("_lo", "_hi"))] and "[" not in text


def test_cost_columns_come_from_the_newest_counted_result(results, tmp_path):
    wide, _, text = build_leaderboard(results, tmp_path / "lb.csv", resamples=0)
    strong = wide.set_index("upstream").loc["strong"]
    assert (strong["params_m"], strong["gflops_per_audio_s"], strong["rtf"]) == (2.5, 1.25, 0.004)
    assert strong["cost_device"] == "cpu fp32 2 threads (Test CPU)"
    assert pd.isna(wide.set_index("upstream").loc["stale", "params_m"])
    assert "measured on: cpu fp32 2 threads (Test CPU)" in text
    units = json.loads(units_path(tmp_path / "lb.csv").read_text())
    assert units["rtf"] == "compute s per audio s, lower" and units["params_m"] == "M parameters"


def test_report_files(results, tmp_path, caplog):
    report = tmp_path / "report"
    with caplog.at_level(logging.WARNING, logger="leaderboard"):
        build_leaderboard(results, tmp_path / "lb.csv", resamples=200, report_dir=report)
    page = (report / "index.html").read_text()
    figures = sorted(p.name for p in (report / "figures").iterdir())
    # heat maps: one per upstream with layer weights (stale has them too); line plots: one per task
    assert figures == sorted(f"{stem}.{ext}" for ext in ("png", "svg") for stem in (
        "layers-stale-synth_small", "layers-strong-synth_small", "layers-weak-synth_small",
        "task-KS_acc-synth_small", "task-SID_acc-synth_small", "task-ER_acc-synth_small"))
    assert all((report / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures if f.endswith("png"))
    assert page.count('<img src="data:image/svg+xml;base64,') == 6  # every figure embedded: the page stands alone
    assert "<script" not in page and "http://" not in page and "https://" not in page
    table = page[page.index('<table id="leaderboard">'):page.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)
    strong_row = next(r for r in rows if ">strong<" in r)
    # strong is best on KS, SID and ER within synth/small; stale's 42 is not the best KS
    assert strong_row.count('class="best"') == 3 and '<span class="ci">[' in strong_row
    assert "superb_paper_2021" in page and "not SUPERB numbers" in page and "no interval" in page
    markdown = (report / "leaderboard.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| upstream"))
    assert header.startswith("| upstream | corpus | profile | KS_acc (% higher) | SID_acc (% higher) |")
    strong_md = next(line for line in markdown.splitlines() if line.startswith("| strong "))
    assert strong_md.count("**") == 6 and re.search(r"\*\*\d+\.\d\d\*\* \[\d+\.\d\d, \d+\.\d\d\]", strong_md)
    assert "params" in header and "| 2.50 |" in strong_md


def test_cli_report_option(results, tmp_path, capsys):
    assert main(["leaderboard", str(results), "--out", str(tmp_path / "lb.csv"), "--report", str(tmp_path / "r"),
                 "--resamples", "100", "--seed", "3"]) == 0
    assert "strong" in capsys.readouterr().out
    assert (tmp_path / "r" / "index.html").is_file() and (tmp_path / "r" / "leaderboard.md").is_file()
    assert main(["leaderboard", str(results), "--out", str(tmp_path / "lb.csv"), "--resamples", "-1"]) == 2


def test_format_table_shows_intervals_inline(results, tmp_path):
    wide, _, _ = build_leaderboard(results, tmp_path / "lb.csv", resamples=100)
    header = format_table(wide).splitlines()[0].split()
    assert "KS_acc" in header and "KS_acc_lo" not in header and "cost_device" not in header


def test_leaderboard_modules_import_neither_torch_nor_downstreams():
    code = ("import sys, speechbench.leaderboard.build, speechbench.leaderboard.compare, "
            "speechbench.leaderboard.report, speechbench.leaderboard.plots; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('speechbench.downstreams')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _chromium() -> tuple[str, str] | None:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium and chromium-driver packages "
                                                "(apt-get install -y chromium chromium-driver)")
def test_report_in_a_headless_browser(results, tmp_path):
    """The page loads in a real Chromium without console errors; the table and every figure are visible."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    report = tmp_path / "report"
    build_leaderboard(results, tmp_path / "lb.csv", resamples=200, report_dir=report)
    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get((report / "index.html").as_uri())
        assert browser.title == "speechbench leaderboard"
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        table = browser.find_element(By.ID, "leaderboard")
        assert table.is_displayed() and table.size["height"] > 50
        assert len(table.find_elements(By.CSS_SELECTOR, "tbody tr")) == 3
        images = browser.find_elements(By.CSS_SELECTOR, "#figures img")
        assert len(images) == 6
        for image in images:  # decoded (natural size) and laid out
            assert image.is_displayed() and image.size["width"] > 100
            assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 100
        browser.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
    finally:
        browser.quit()
