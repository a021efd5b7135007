"""``bench leaderboard RESULTS_DIR --out FILE.csv``: collect, tabulate, write both CSVs atomically, print.

Writes ``FILE.csv`` (the wide table with its ``(unit)`` row, see :mod:`leaderboard.tables`) and, beside it,
``FILE.long.csv`` (every collected result, plus ``counted``: whether the row entered the wide table).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from speechbench.leaderboard.collect import collect_results
from speechbench.leaderboard.references import DEFAULT_REFERENCE, ReferenceSet
from speechbench.leaderboard.tables import counted_rows, format_table, wide_table, wide_to_csv


def build_leaderboard(results_dir: str | Path, out_csv: str | Path, reference: str | ReferenceSet | None =
                      DEFAULT_REFERENCE, split: str = "test") -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Aggregate every result.json below ``results_dir``; write the wide and long CSVs; return (wide, long, text)."""
    long_df = collect_results(results_dir)
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


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, flush to disk, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
