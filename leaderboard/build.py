"""``bench leaderboard RESULTS_DIR --out FILE.csv [--report DIR]``: collect, tabulate, write, print.

Writes ``FILE.csv`` (the wide table, see :mod:`leaderboard.tables`, with interval columns ``<col>_lo``/``<col>_hi``
and cost columns, see :mod:`leaderboard.cells`), ``FILE.units.json`` (the unit and direction of each column)
and ``FILE.long.csv`` (every collected result, plus ``counted``: whether the row entered the wide table), all
atomically. With ``report_dir``: the HTML and Markdown report and the layer-weight figures
(:mod:`leaderboard.report`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from speechbench.common import atomic_write_text
from speechbench.leaderboard.cells import add_cost_columns, add_intervals, cell_layer_weights
from speechbench.leaderboard.collect import collect_results
from speechbench.leaderboard.references import DEFAULT_REFERENCE, ReferenceSet, load_reference
from speechbench.leaderboard.stats import CONFIDENCE, DEFAULT_RESAMPLES, DEFAULT_SEED
from speechbench.leaderboard.tables import (
    counted_rows,
    format_table,
    units_path,
    units_to_json,
    wide_table,
    wide_to_csv,
)


def build_leaderboard(results: str | Path | Sequence[str | Path], out_csv: str | Path,
                      reference: str | ReferenceSet | None = DEFAULT_REFERENCE, split: str = "test",
                      resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                      report_dir: str | Path | None = None, confidence: float = CONFIDENCE,
                      ) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Aggregate every result.json below a directory (or the given result.json files); write the CSVs (and the
    report); return (wide, long, text). ``resamples=0`` leaves the interval columns out."""
    long_df = collect_results(results)
    counted = counted_rows(long_df, split)
    long_df["counted"] = long_df.index.isin(counted.index)
    ref = load_reference(reference) if isinstance(reference, str) else reference
    wide = wide_table(long_df, reference=ref, split=split)
    wide = add_intervals(wide, counted, resamples=resamples, seed=seed, confidence=confidence)
    wide = add_cost_columns(wide, counted)
    out_csv = Path(out_csv)
    atomic_write_text(out_csv, wide_to_csv(wide))
    atomic_write_text(units_path(out_csv), units_to_json(wide))
    atomic_write_text(long_csv_path(out_csv), long_df.to_csv(index=False, lineterminator="\n"))
    if report_dir is not None:
        from speechbench.leaderboard.plots import write_layer_weight_figures
        from speechbench.leaderboard.report import write_report

        figures = write_layer_weight_figures(cell_layer_weights(counted), Path(report_dir) / "figures")
        source = str(results) if isinstance(results, str | Path) else f"{len(results)} result files"
        write_report(wide, report_dir, figures, ref, source=source)
    return wide, long_df, format_table(wide)


def long_csv_path(out_csv: str | Path) -> Path:
    """``results/lb.csv -> results/lb.long.csv``."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}.long.csv")
