"""From the long table of results to the wide leaderboard: one row per upstream and corpus, one column per metric.

Rows of the wide table are keyed by ``(upstream, corpus, profile)``:

- ``corpus`` is ``"synth"`` for the bundled synthetic smoke-benchmark corpus and ``"real"`` for the tasks' real
  corpora (their names differ per task, e.g. ``speech_commands_v0.01`` for KS; they stay in the long table's
  ``corpus`` column). A result without a corpus is ``"unknown"``.
- ``profile`` is the synthetic corpus size (``tiny``, ``small``); empty for real corpora, so that tiny smoke runs
  never mix with small ones.

Aggregation rules (in this order):

1. Only rows with ``selected=True`` count: in a learning-rate/seed sweep that is the best-on-dev run.
2. Only rows of the reported split (``split="test"`` by default; a row without a split counts).
3. Several runs for the same (upstream, corpus, profile, task, fold, seed): the newest ``timestamp`` wins
   (ties and missing timestamps: the later path in sort order wins; missing timestamps count as oldest).
4. Tasks with folds (ER: 5 leave-one-session-out folds): per seed, the mean over folds. The wide table gets
   ``<column>_folds``, the number of distinct folds averaged; the per-fold values stay in the long table.
5. Several seeds: the mean over seeds; ``<column>_seeds`` (number of seeds) is added when any cell has more than one.

Columns are named ``PR_per``, ``KS_acc``, ``IC_acc``, ``SID_acc``, ``ER_acc``, ``ASR_wer``, ``ASV_eer`` (the
reference CSV's names) and ``<task>_<metric>`` for any other task. ``SUPERB_score`` (with ``SUPERB_reference``, the
reference set's name) is filled only for ``corpus="real"`` rows that have every metric of the reference set, each
from results whose protocol fingerprint matches SUPERB's (``superb_faithful``; for a task with folds, every fold):
``1000 * mean over tasks of (score - baseline) / (sota - baseline)``, baseline = the reference's FBANK row and SOTA
= the reference's best row per task (lower-is-better metrics need no special case: both differences flip sign).
A real-corpus row without a score says why in ``SUPERB_excluded`` (per metric: missing, the first protocol deviation,
no fingerprint in an older result, or too few folds); the printed table gives the same reasons as footer lines.

Units and directions (the CSV convention): the wide CSV is one header row of the column names above and one line per
row, so a plain ``pd.read_csv(path)`` reads it. Units live in a sidecar, ``<stem>.units.json`` (:func:`units_path`):
a JSON object from column name to ``"<unit> higher"`` or ``"<unit> lower"`` (e.g. ``% higher`` for accuracy,
``% lower`` for WER), ``count`` for count columns. :func:`read_wide_csv` reads both. In memory the same strings are
in ``wide.attrs["units"]``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from speechbench.leaderboard.collect import DEVIATION_SEPARATOR
from speechbench.leaderboard.columns import column_direction, column_order
from speechbench.leaderboard.references import DEFAULT_REFERENCE, ReferenceSet, load_reference

log = logging.getLogger("leaderboard")

SYNTH = "synth"
REAL = "real"
KEY_COLUMNS = ["upstream", "corpus", "profile"]
SYNTH_FOOTER = "synth = synthetic smoke-benchmark corpus, not SUPERB numbers"
REAL_FOOTER = "real = each task's public corpus (per-task corpus names in the long CSV)"
EXCLUDED = "SUPERB_excluded"
PROTOCOL_FOOTER = ("SUPERB_score counts only results whose protocol fingerprint matches SUPERB's protocol "
                   "(superb_faithful in result.json)")


def corpus_group(corpus: object) -> str:
    """The wide table's corpus label of a result's corpus name: ``synth``, ``real`` or ``unknown``."""
    if not isinstance(corpus, str) or not corpus:
        return "unknown"
    return SYNTH if corpus == SYNTH else REAL


def counted_rows(long_df: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """The rows of the long table that enter the wide table (rules 1-3 above), with ``corpus`` kept as is."""
    df = long_df[long_df["selected"].fillna(True).astype(bool)]
    df = df[df["split"].isna() | (df["split"] == split)]
    df = _with_row_key(df).assign(_time=pd.to_datetime(df["timestamp"], utc=True, errors="coerce", format="ISO8601"))
    df = df.sort_values(["_time", "path"], na_position="first", kind="stable")
    key = ["upstream", "_corpus", "_profile", "column", "fold", "seed"]
    return df.drop_duplicates(subset=key, keep="last").drop(columns=["_corpus", "_profile", "_time"])


def wide_table(long_df: pd.DataFrame, reference: str | ReferenceSet | None = DEFAULT_REFERENCE,
               split: str = "test") -> pd.DataFrame:
    """One row per (upstream, corpus, profile), one column per task metric; see the module docstring for the rules.

    ``reference``: name of a shipped reference set, a :class:`ReferenceSet`, or None for no ``SUPERB_score``.
    """
    rows = counted_rows(long_df, split)
    units = _column_units(rows)
    if rows.empty:
        log.warning("no selected %s-split results to tabulate", split)
        empty = pd.DataFrame(columns=KEY_COLUMNS)
        empty.attrs["units"] = {}
        return empty
    rows = _with_row_key(rows)
    _warn_mixed_corpora(rows)
    rows = rows.drop(columns=["corpus", "profile"]).rename(columns={"_corpus": "corpus", "_profile": "profile"})
    cell = KEY_COLUMNS + ["column"]
    per_seed = rows.groupby(cell + ["seed"], dropna=False).agg(value=("value", "mean"), folds=("fold", "nunique"))
    cells = per_seed.groupby(cell, dropna=False).agg(value=("value", "mean"), folds=("folds", "max"),
                                                    seeds=("value", "size"))
    wide = cells["value"].unstack("column")
    metrics = column_order(list(wide.columns))
    out = pd.DataFrame(index=wide.index)
    for col in metrics:
        out[col] = wide[col]
        if rows.loc[rows["column"] == col, "fold"].notna().any():
            folds = cells["folds"].unstack("column")[col]
            out[f"{col}_folds"] = folds.where(folds > 0).astype("Int64")  # NA: a cell of runs without folds
            units[f"{col}_folds"] = "count"
        seeds = cells["seeds"].unstack("column")[col]
        if seeds.max() > 1:
            out[f"{col}_seeds"] = seeds.astype("Int64")
            units[f"{col}_seeds"] = "count"
    out = out.reset_index()
    out.columns.name = None
    if reference is not None:
        ref = load_reference(reference) if isinstance(reference, str) else reference
        exclusions = superb_exclusions(rows, out, ref)
        out["SUPERB_score"] = superb_scores(out, ref).where(exclusions == "")
        out["SUPERB_reference"] = np.where(out["SUPERB_score"].notna(), ref.name, "")
        out[EXCLUDED] = exclusions
        units["SUPERB_score"] = "higher"
        out.attrs["unchecked_reference_rows"] = ref.unchecked_rows()
    out["_order"] = out["corpus"].map({REAL: 0, SYNTH: 1}).fillna(2)
    out = out.sort_values(["_order", "upstream", "profile"], kind="stable").drop(columns="_order")
    out = out.reset_index(drop=True)
    out.attrs["units"] = units
    return out


def superb_scores(wide: pd.DataFrame, reference: ReferenceSet) -> pd.Series:
    """SUPERB score per wide row (NaN unless the row is real-corpus and has every metric of the reference set)."""
    columns = reference.metric_columns
    if not set(columns) <= set(wide.columns):
        return pd.Series(np.nan, index=wide.index)
    base, best = reference.baseline_values(), reference.best_values()
    normalised = (wide[columns].astype(float) - base) / (best - base)
    complete = wide[columns].notna().all(axis=1) & (wide["corpus"] == REAL)
    return (1000 * normalised.mean(axis=1)).where(complete)


def superb_exclusions(rows: pd.DataFrame, wide: pd.DataFrame, reference: ReferenceSet) -> pd.Series:
    """Why each real-corpus wide row gets no SUPERB score ("" when it gets one, and for other corpora):
    ``"<column>: <reason>"`` per reference metric, joined by ``"; "``.

    ``rows``: the counted long rows with the wide table's key columns (``corpus`` already ``real``/``synth``).
    """
    reasons = pd.Series("", index=wide.index, dtype=object)
    for i in wide.index[wide["corpus"] == REAL]:
        key = (rows["upstream"] == wide.at[i, "upstream"]) & (rows["corpus"] == REAL)
        parts = []
        for col in reference.metric_columns:
            cell = rows[key & (rows["column"] == col)]
            reason = "no result" if cell.empty else _protocol_reason(cell, wide.get(f"{col}_folds", {}).get(i))
            if reason:
                parts.append(f"{col}: {reason}")
        reasons[i] = "; ".join(parts)
    return reasons


def _protocol_reason(cell: pd.DataFrame, folds_done) -> str:
    """"" when every result of a wide cell matches SUPERB's protocol (and covers every fold), else why not."""
    bad = cell[~cell["superb_faithful"].fillna(False).astype(bool)]
    if not bad.empty:
        first = bad.iloc[0]
        if pd.isna(first["superb_faithful"]):
            return f"no protocol fingerprint (result schema {first['schema_version']})"
        deviations = [d for d in str(first["protocol_deviations"] or "").split(DEVIATION_SEPARATOR) if d]
        if not deviations:
            return f"recipe {first['recipe']} does not reproduce SUPERB's protocol"
        return deviations[0] + (f" (+{len(deviations) - 1} more)" if len(deviations) > 1 else "")
    expected = cell["protocol_folds"].max()
    if pd.notna(expected) and (folds_done is None or pd.isna(folds_done) or int(folds_done) < int(expected)):
        done = 0 if folds_done is None or pd.isna(folds_done) else int(folds_done)
        return f"{done} of {int(expected)} folds"
    return ""



def units_of(wide: pd.DataFrame) -> dict[str, str]:
    """Each non-key column's unit and direction (``"% higher"``, ``count``, ...), as the units sidecar holds them."""
    units = _units_of(wide)
    return {c: units[c] for c in wide.columns if c in units and c not in KEY_COLUMNS}


def units_path(csv_path: str | Path) -> Path:
    """``lb.csv -> lb.units.json``: the units sidecar of a wide CSV."""
    csv_path = Path(csv_path)
    return csv_path.with_name(f"{csv_path.stem}.units.json")


def wide_to_csv(wide: pd.DataFrame) -> str:
    """The wide table as CSV text: one header row, then one line per row (units go to the sidecar)."""
    return wide.to_csv(index=False, float_format="%.6g", lineterminator="\n")


def units_to_json(wide: pd.DataFrame) -> str:
    """The units sidecar's text: ``{"KS_acc": "% higher", ...}``."""
    return json.dumps(units_of(wide), indent=2) + "\n"


def read_wide_csv(path: str | Path) -> pd.DataFrame:
    """Read a wide CSV written by :func:`wide_to_csv`, with its sidecar's units (if present) in ``attrs["units"]``."""
    head = pd.read_csv(path, nrows=0)
    text_columns = {c: str for c in KEY_COLUMNS + ["SUPERB_reference", "cost_device", EXCLUDED] if c in head.columns}
    wide = pd.read_csv(path, dtype=text_columns, keep_default_na=False, na_values=[""])
    for col in text_columns:
        wide[col] = wide[col].fillna("")
    sidecar = units_path(path)
    wide.attrs["units"] = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
    return wide


def format_table(wide: pd.DataFrame) -> str:
    """A fixed-width text table (header, unit row, one line per row) plus explanatory footer lines. Interval columns
    (``<col>_lo``, ``<col>_hi``) are shown inside their metric's cell as ``value [lo, hi]``."""
    if wide.empty:
        return "(empty leaderboard: no selected results on the reported split)"
    hidden = {"SUPERB_reference", "cost_device", EXCLUDED}
    hidden |= {f"{c}{s}" for c in wide.columns for s in INTERVAL_SUFFIXES}
    shown = [c for c in wide.columns if c in ("upstream", "corpus")
             or (c not in hidden and wide[c].replace("", np.nan).notna().any())]
    units = _units_of(wide)
    header = [str(c) for c in shown]
    unit_line = ["" if c in KEY_COLUMNS else units.get(c, "") for c in shown]
    body = [[_fmt_cell(c, row) for c in shown] for _, row in wide.iterrows()]
    numeric = [c not in KEY_COLUMNS for c in shown]
    widths = [max(len(line[i]) for line in [header, unit_line, *body]) for i in range(len(shown))]

    def line(cells: list[str]) -> str:
        padded = (s.rjust(w) if num else s.ljust(w) for s, w, num in zip(cells, widths, numeric, strict=True))
        return "  ".join(padded).rstrip()

    lines = [line(header), line(unit_line), "  ".join("-" * w for w in widths)] + [line(r) for r in body]
    corpora = set(wide.get("corpus", pd.Series(dtype=str)))
    if REAL in corpora:
        lines.append(REAL_FOOTER)
    if SYNTH in corpora:
        lines.append(SYNTH_FOOTER)
    if "SUPERB_score" in wide.columns and wide["SUPERB_score"].notna().any():
        names = sorted(set(wide.loc[wide["SUPERB_score"].notna(), "SUPERB_reference"]))
        lines.append(f"SUPERB_score: 0 = FBANK, 1000 = SOTA of reference set {', '.join(names)}")
    if (spec := wide.attrs.get("intervals")) and any(f"{c}_lo" in wide.columns for c in shown):
        lines.append(f"[lo, hi]: {100 * spec['confidence']:g}% bootstrap interval over the test items "
                     f"({spec['resamples']} resamples, seed {spec['seed']}); a value without one has no interval "
                     f"(see the warnings)")
    if "cost_device" in wide.columns and (devices := sorted(set(wide["cost_device"]) - {""})):
        lines.append(f"cost (params_m, gflops_per_audio_s, rtf) measured on: {'; '.join(devices)}")
    if EXCLUDED in wide.columns and wide[EXCLUDED].fillna("").astype(bool).any():
        lines.append(PROTOCOL_FOOTER + f"; real-corpus rows left out ({EXCLUDED} in the CSV):")
        lines += [f"  {row.upstream}: {getattr(row, EXCLUDED)}" for row in wide.itertuples(index=False)
                  if getattr(row, EXCLUDED)]
    unchecked = wide.attrs.get("unchecked_reference_rows")
    if unchecked:
        lines.append(f"reference values not yet checked against their source: {', '.join(unchecked)}")
    return "\n".join(lines)


INTERVAL_SUFFIXES = ("_lo", "_hi")


def _fmt_cell(column: str, row: pd.Series) -> str:
    """``value [lo, hi]`` for a metric with an interval, else the plain value."""
    text = _fmt(column, row[column])
    lo, hi = row.get(f"{column}_lo"), row.get(f"{column}_hi")
    if text != "-" and lo is not None and hi is not None and not (pd.isna(lo) or pd.isna(hi)):
        text += f" [{_fmt(column, lo)}, {_fmt(column, hi)}]"
    return text


def _fmt(column: str, value: object) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if column in KEY_COLUMNS or column == "SUPERB_reference":
        return str(value)
    if column.endswith(("_folds", "_seeds")):
        return str(int(value))
    if column in ("gflops_per_audio_s", "rtf"):
        return f"{value:.3g}"
    return f"{value:.1f}" if column == "SUPERB_score" else f"{value:.2f}"


def _column_units(rows: pd.DataFrame) -> dict[str, str]:
    """``"<unit> higher|lower"`` per metric column; a column whose rows disagree on unit or direction is an error."""
    units = {}
    for col, group in rows.groupby("column"):
        labels = {_unit_label(u, h) for u, h in zip(group["unit"].fillna(""), group["higher_is_better"], strict=True)}
        if len(labels) > 1:
            files = ", ".join(group["path"].astype(str).head(5))
            raise ValueError(f"results for {col} disagree on unit/direction ({sorted(labels)}): {files}")
        units[col] = labels.pop()
    return units


def _unit_label(unit: str, higher: bool) -> str:
    return f"{unit} {'higher' if higher else 'lower'}".strip()


def _units_of(wide: pd.DataFrame) -> dict[str, str]:
    units = dict(wide.attrs.get("units", {}))
    for col in wide.columns:
        if col not in units and col not in KEY_COLUMNS and (direction := column_direction(col)) is not None:
            units[col] = _unit_label("", direction)
    return units


def _with_row_key(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``_corpus`` (synth/real/unknown) and ``_profile`` (the synth profile, empty for real corpora)."""
    group = df["corpus"].map(corpus_group)
    profile = np.where(group == SYNTH, df["profile"].fillna("").astype(str), "")
    return df.assign(_corpus=group, _profile=profile)


def _warn_mixed_corpora(rows: pd.DataFrame) -> None:
    """A wide cell averaging runs on different real corpora (e.g. Speech Commands v0.01 and v0.02) gets a warning."""
    for (upstream, column), group in rows.groupby(["upstream", "column"]):
        for _, cell in group.groupby(["_corpus", "_profile"]):
            names = sorted(set(cell["corpus"].dropna()))
            if len(names) > 1:
                log.warning("%s of %s mixes results from several corpora: %s", column, upstream, ", ".join(names))
