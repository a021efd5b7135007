"""What the wide table adds from the files beside each counted ``result.json``: interval columns, cost columns and
the layer weights of each cell.

- ``<col>_lo``, ``<col>_hi``: the percentile bootstrap interval (95 % by default) of each metric cell, from the
  runs' ``items.jsonl`` (:mod:`leaderboard.stats`); inserted right after ``<col>``. A cell gets no interval (empty)
  when one of its runs has no usable per-item file, when the file does not reproduce the run's value (a stale or
  foreign file: the numbers would be wrong), or when its seeds scored different items; the reason is kept in
  ``wide.attrs["interval_notes"]`` and logged.
- ``params_m``, ``gflops_per_audio_s``, ``rtf``, ``cost_device``: the upstream's measured cost
  (``benchmark/cost.py``) as recorded in its newest counted result; empty for results without one.

A cell is keyed like a wide row plus its metric column: ``(upstream, corpus, profile, column)``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from speechbench.leaderboard.items import ItemsError, read_items
from speechbench.leaderboard.stats import (
    CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    BootstrapError,
    Cell,
    bootstrap_interval,
    same_items,
)
from speechbench.leaderboard.tables import SYNTH, corpus_group

log = logging.getLogger("leaderboard")

COST_COLUMNS = {"params_m": "M parameters", "gflops_per_audio_s": "GFLOPs per audio s, lower",
                "rtf": "compute s per audio s, lower"}


def cell_key(row) -> tuple:
    """``(upstream, corpus, profile, column)`` of a counted long-table row, as the wide table groups it."""
    group = corpus_group(row["corpus"])
    profile = "" if group != SYNTH or not isinstance(row["profile"], str) else row["profile"]
    return row["upstream"], group, profile, row["column"]


def load_cell(rows: pd.DataFrame) -> Cell:
    """The per-item scores of one cell's counted runs, ``{(fold, seed): ItemScores}``, each fold's runs aligned to
    one item order. Raises :class:`ItemsError` (one line) when a run's items are missing, do not reproduce its
    value, or differ from another seed's on the same fold."""
    cell: dict = {}
    for row in rows.itertuples(index=False):
        items = read_items(row.path)
        recomputed = items.metric()
        if not math.isclose(recomputed, row.value, rel_tol=1e-6, abs_tol=1e-6):
            raise ItemsError(f"{Path(row.path).with_name('items.jsonl')} gives {row.metric} {recomputed:.6g}, but "
                             f"{row.path} says {row.value:.6g}: the per-item file is not this run's")
        fold = None if pd.isna(row.fold) else int(row.fold)
        seed = None if pd.isna(row.seed) else int(row.seed)
        first = next((other for (f, _), other in cell.items() if f == fold), None)
        if first is not None:
            why = same_items(first, items)
            if why:
                raise ItemsError(f"{row.path}: its seeds scored different test items on fold {fold} ({why})")
            items = items.aligned_to(first.ids)
        cell[(fold, seed)] = items
    return cell


def add_intervals(wide: pd.DataFrame, counted: pd.DataFrame, resamples: int = DEFAULT_RESAMPLES,
                  seed: int = DEFAULT_SEED, confidence: float = CONFIDENCE) -> pd.DataFrame:
    """A copy of ``wide`` with ``<col>_lo`` and ``<col>_hi`` after every metric column (``resamples=0``: none)."""
    if resamples <= 0 or wide.empty:
        return wide
    bounds: dict[tuple, tuple[float, float]] = {}
    notes = []
    keyed = counted.assign(_key=[cell_key(r) for _, r in counted.iterrows()])
    for key, rows in keyed.groupby("_key", sort=False):
        try:
            bounds[key] = bootstrap_interval(load_cell(rows), resamples, seed, confidence)
        except (ItemsError, BootstrapError) as e:
            notes.append(f"{key[0]} {key[3]}: no interval: {e}")
            log.warning("%s", notes[-1])
    out = wide.copy()
    units = dict(wide.attrs.get("units", {}))
    for col in [c for c in wide.columns if c in set(counted["column"])]:
        keys = [(r["upstream"], r["corpus"], r["profile"], col) for _, r in wide.iterrows()]
        at = out.columns.get_loc(col) + 1
        for k, (suffix, side) in enumerate((("_lo", 0), ("_hi", 1))):
            out.insert(at + k, f"{col}{suffix}", [bounds[key][side] if key in bounds else np.nan for key in keys])
            units[f"{col}{suffix}"] = units.get(col, "")
    out.attrs = {**wide.attrs, "units": units, "interval_notes": notes,
                 "intervals": {"resamples": resamples, "seed": seed, "confidence": confidence}}
    return out


def read_run_extras(path: str | Path) -> dict:
    """``layer_weights``, ``layer`` and ``cost`` of one result.json (empty values when absent or unreadable)."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: result.get(k) for k in ("layer_weights", "layer", "cost", "timestamp")}


def add_cost_columns(wide: pd.DataFrame, counted: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``wide`` with the upstream's recorded cost (:data:`COST_COLUMNS` and ``cost_device``) per row,
    taken from the newest counted result of the row that has one; nothing is added when no result has a cost."""
    if wide.empty:
        return wide
    newest: dict[tuple, tuple[str, dict]] = {}
    for _, row in counted.iterrows():
        cost = read_run_extras(row["path"]).get("cost")
        if not isinstance(cost, dict):
            continue
        key = cell_key(row)[:3]
        stamp = str(row["timestamp"] or "")
        if key not in newest or stamp >= newest[key][0]:
            newest[key] = (stamp, cost)
    if not newest:
        return wide
    out = wide.copy()
    keys = [(r["upstream"], r["corpus"], r["profile"]) for _, r in wide.iterrows()]
    costs = [newest.get(k, ("", {}))[1] for k in keys]
    out["params_m"] = [c["params"] / 1e6 if "params" in c else np.nan for c in costs]
    out["gflops_per_audio_s"] = [c.get("gflops_per_audio_s", np.nan) for c in costs]
    out["rtf"] = [c.get("rtf", np.nan) for c in costs]
    out["cost_device"] = [_device_text(c) for c in costs]
    out.attrs = {**wide.attrs, "units": {**wide.attrs.get("units", {}), **COST_COLUMNS}}
    return out


def _device_text(cost: dict) -> str:
    if not cost:
        return ""
    threads = cost.get("threads")
    return " ".join(str(p) for p in (cost.get("device"), cost.get("precision"),
                                     f"{threads} thread{'s' if threads != 1 else ''}" if threads else None,
                                     f"({cost['machine']})" if cost.get("machine") else None) if p)


def cell_layer_weights(counted: pd.DataFrame) -> dict[tuple, np.ndarray]:
    """The mean learned layer weights ``[L]`` of each cell's counted runs (runs probing one ``--layer`` and runs
    without weights are left out), keyed by :func:`cell_key`."""
    weights: dict[tuple, list] = {}
    for _, row in counted.iterrows():
        extras = read_run_extras(row["path"])
        w = extras.get("layer_weights")
        if extras.get("layer") is None and isinstance(w, list) and len(w) > 0:
            weights.setdefault(cell_key(row), []).append(np.asarray(w, dtype=float))
    return {k: np.mean(v, axis=0) for k, v in weights.items() if len({len(x) for x in v}) == 1}
