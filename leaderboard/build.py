"""``bench leaderboard RESULTS_DIR --out FILE.csv``: collect, tabulate, write both CSVs atomically, print.

Writes ``FILE.csv`` (the wide table with its ``(unit)`` row, see :mod:`leaderboard.tables`) and, beside it,
``FILE.long.csv`` (every collected result, plus ``counted``: whether the row entered the wide table).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from speechbench.common import atomic_write_text
from speechbench.leaderboard.collect import collect_results
from speechbench.leaderboard.references import DEFAULT_REFERENCE, ReferenceSet
from speechbench.leaderboard.tables import counted_rows, format_table, wide_table, wide_to_csv


def build_leaderboard(results: str | Path | Sequence[str | Path], out_csv: str | Path,
                      reference: str | ReferenceSet | None = DEFAULT_REFERENCE,
                      split: str = "test") -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Aggregate every result.json below a directory (or the given result.json files); write the wide and long CSVs;
    return (wide, long, text)."""
    long_df = collect_results(results)
    long_df["counted"] = long_df.index.isin(counted_rows(long_df, split).index)
    wide = wide_table(long_df, reference=reference, split=split)
    out_csv = Path(out_csv)
    atomic_write_text(out_csv, wide_to_csv(wide))
    atomic_write_text(long_csv_path(out_csv), long_df.to_csv(index=False, lineterminator="\n"))
    return wide, long_df, format_table(wide)


def long_csv_path(out_csv: str | Path) -> Path:
    """``results/lb.csv -> results/lb.long.csv``."""
    out_csv = Path(out_csv)
    return out_csv.with_name(f"{out_csv.stem}.long.csv")
