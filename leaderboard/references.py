"""Published reference results, versioned as data: the anchors of the SUPERB score.

A reference set is one CSV in ``leaderboard/reference/`` (one row per upstream, one column per task metric named
like the wide table's, e.g. ``KS_acc``; other columns such as ``params_m``, ``checked`` and ``source`` are kept but not
scored). The optional ``checked`` column (yes/no, true/false per row) says whether the row's values were confirmed
against the publication named in ``source``; the printed leaderboard lists the rows that were not.
``reference/sets.csv`` is the index of sets: ``name``, ``date``, ``file``, ``baseline`` (the row that scores 0,
FBANK in SUPERB), ``description``, ``source``. Adding a set means adding a CSV and one index row, no code.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd

from speechbench.common import UnknownNameError
from speechbench.leaderboard.columns import column_direction

DEFAULT_REFERENCE = "superb_paper_2021"
_INDEX = "sets.csv"


@dataclass(frozen=True)
class ReferenceSet:
    """A named, dated table of reference results; ``table`` is indexed by upstream name."""

    name: str
    date: str
    baseline: str
    table: pd.DataFrame
    directions: dict[str, bool]  # metric column -> higher is better
    description: str = ""
    source: str = ""

    @property
    def metric_columns(self) -> list[str]:
        return list(self.directions)

    def baseline_values(self) -> pd.Series:
        """The baseline row (FBANK): the score-0 anchor per metric column."""
        return self.table.loc[self.baseline, self.metric_columns].astype(float)

    def unchecked_rows(self) -> list[str]:
        """The rows whose ``checked`` column is not true ([] without such a column)."""
        if "checked" not in self.table.columns:
            return []
        checked = self.table["checked"].astype(str).str.strip().str.lower().isin(("true", "yes", "1"))
        return [str(name) for name in self.table.index[~checked]]

    def best_values(self) -> pd.Series:
        """SOTA per metric column: the best value over all rows, honouring each metric's direction."""
        values = self.table[self.metric_columns].astype(float)
        return pd.Series({c: values[c].max() if self.directions[c] else values[c].min() for c in values.columns})


def available_references() -> pd.DataFrame:
    """The index of shipped reference sets (one row per set)."""
    with resources.as_file(_reference_dir() / _INDEX) as path:
        return pd.read_csv(path, dtype=str, keep_default_na=False)


def load_reference(name: str = DEFAULT_REFERENCE) -> ReferenceSet:
    """Load a shipped reference set by name (see :func:`available_references`)."""
    index = available_references()
    row = index[index["name"] == name]
    if row.empty:
        known = ", ".join(index["name"])
        raise UnknownNameError(f"unknown reference set {name!r}; available: {known}")
    meta = row.iloc[0]
    with resources.as_file(_reference_dir() / meta["file"]) as path:
        table = pd.read_csv(path)
    return reference_from_table(table, name=name, date=meta["date"], baseline=meta["baseline"],
                                description=meta["description"], source=meta["source"])


def reference_from_table(table: pd.DataFrame | str | Path, *, name: str, date: str, baseline: str = "fbank",
                         description: str = "", source: str = "") -> ReferenceSet:
    """Build a reference set from a table (or CSV path) with an ``upstream`` column and ``<TASK>_<metric>`` columns.

    Metric columns are those whose metric has a known direction (``acc``, ``per``, ``wer``, ``eer``, ...).
    """
    if not isinstance(table, pd.DataFrame):
        table = pd.read_csv(table)
    if "upstream" not in table.columns:
        raise ValueError(f"reference set {name!r} has no 'upstream' column")
    table = table.set_index("upstream")
    if baseline not in table.index:
        raise ValueError(f"reference set {name!r} has no baseline row {baseline!r}")
    directions = {c: d for c in table.columns if (d := column_direction(c)) is not None}
    if not directions:
        raise ValueError(f"reference set {name!r} has no metric columns")
    return ReferenceSet(name=name, date=str(date), baseline=baseline, table=table, directions=directions,
                        description=description, source=source)


def _reference_dir():
    return resources.files("speechbench.leaderboard").joinpath("reference")
