"""Collect every ``result.json`` below a directory into one long table (one row per file).

A file that cannot be read, is not valid JSON, has an unsupported ``schema_version`` or lacks a usable task,
metric or value is skipped with a one-line warning naming it (logger ``leaderboard``); one bad file never stops
the aggregation. Rows without ``selected`` are single runs, i.e. their own selection (``selected=True``).

The protocol fingerprint (schema 3, ``benchmark/protocol.py``) becomes ``superb_faithful`` (True/False; None for an
older file, which has none), ``protocol_deviations`` (the deviations joined by ``" | "``) and ``protocol_folds`` (the
folds a task's number averages, e.g. 5 for ER).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from speechbench.common import SpeechbenchError
from speechbench.leaderboard.columns import metric_column, metric_direction

log = logging.getLogger("leaderboard")

RESULT_FILENAME = "result.json"
DEVIATION_SEPARATOR = " | "
# 2: the upstream record is describe_upstream() (checkpoint_format, family, ...); 3: the protocol fingerprint
SUPPORTED_SCHEMA_VERSIONS = (1, 2, 3)

LONG_COLUMNS = ["upstream", "task", "metric", "column", "value", "unit", "higher_is_better", "corpus", "profile",
                "split", "fold", "learning_rate", "seed", "selected", "recipe", "config_sha256", "best_step",
                "wall_time_s", "timestamp", "run_id", "path", "checkpoint_sha256", "schema_version", "superb_faithful",
                "protocol_deviations", "protocol_folds"]


class NoResultsError(SpeechbenchError, FileNotFoundError):
    """No usable result.json below the results directory."""


class BadResultError(SpeechbenchError, ValueError):
    """One result.json cannot be used; the message says why."""


def collect_results(results: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """One row per readable ``result.json`` (columns: ``LONG_COLUMNS``): every one found recursively below a
    directory, or exactly the given files (``bench sweep`` tabulates its own runs only)."""
    if isinstance(results, str | Path):
        root = Path(results)
        if not root.is_dir():
            raise NoResultsError(f"results directory {root} does not exist or is not a directory")
        paths = sorted(root.rglob(RESULT_FILENAME))
        if not paths:
            raise NoResultsError(f"no {RESULT_FILENAME} found under {root}")
        where = f"under {root}"
    else:
        paths = [Path(p) for p in results]
        where = "among the given files"
        if not paths:
            raise NoResultsError(f"no {RESULT_FILENAME} files given")
    rows = []
    for path in paths:
        try:
            rows.append(flatten_result(_read_json(path), path))
        except BadResultError as err:
            log.warning("skipping %s: %s", path, err)
    if not rows:
        raise NoResultsError(f"no usable {RESULT_FILENAME} {where} ({len(paths)} found, all skipped)")
    return _typed(pd.DataFrame(rows, columns=LONG_COLUMNS))


def flatten_result(result: Any, path: str | Path = "") -> dict:
    """One long-table row from a parsed result.json; raises :class:`BadResultError` if it is unusable."""
    if not isinstance(result, dict):
        raise BadResultError("not a JSON object")
    version = result.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise BadResultError(f"unsupported schema_version {version!r} (supported: {SUPPORTED_SCHEMA_VERSIONS})")
    upstream = _section(result, "upstream")
    recipe = _section(result, "recipe")
    data = _section(result, "data")
    protocol = _section(result, "protocol")
    faithful = protocol.get("superb_faithful")
    if version >= 3 and not isinstance(faithful, bool):
        raise BadResultError(f"protocol.superb_faithful {faithful!r} is not true or false")
    deviations = protocol.get("deviations") or []
    if not isinstance(deviations, list) or not all(isinstance(d, str) for d in deviations):
        raise BadResultError("protocol.deviations is not a list of strings")
    folds = protocol.get("folds")
    name = upstream.get("name")
    task, metric = result.get("task"), result.get("metric")
    for field, value in (("upstream name", name), ("task", task), ("metric", metric)):
        if not isinstance(value, str) or not value:
            raise BadResultError(f"missing or invalid {field}")
    value = result.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadResultError(f"value {value!r} is not a finite number")
    column = metric_column(task, metric)
    higher = result.get("higher_is_better", result.get("direction"))
    if isinstance(higher, str):
        higher = {"higher": True, "lower": False}.get(higher.lower())
    if not isinstance(higher, bool):
        higher = metric_direction(metric)
    if higher is None:
        raise BadResultError(f"no higher_is_better for metric {metric!r}")
    selected = result.get("selected")
    for field in ("fold", "seed", "best_step"):
        number = result.get(field)
        if number is not None and (isinstance(number, bool) or not isinstance(number, int)):
            raise BadResultError(f"{field} {number!r} is not an integer or null")
    return {
        "upstream": name, "task": task, "metric": metric, "column": column, "value": float(value),
        "unit": result.get("unit") or "", "higher_is_better": higher,
        "corpus": data.get("corpus"), "profile": data.get("profile"),
        "split": result.get("split"), "fold": result.get("fold"),
        "learning_rate": result.get("learning_rate"), "seed": result.get("seed"),
        "selected": True if selected is None else bool(selected),
        "recipe": recipe.get("name"), "config_sha256": recipe.get("config_sha256"),
        "best_step": result.get("best_step"), "wall_time_s": result.get("wall_time_s"),
        "timestamp": result.get("timestamp"), "run_id": result.get("run_id"), "path": str(path),
        "checkpoint_sha256": upstream.get("checkpoint_sha256"), "schema_version": version,
        "superb_faithful": faithful, "protocol_deviations": DEVIATION_SEPARATOR.join(deviations),
        "protocol_folds": folds if isinstance(folds, int) and not isinstance(folds, bool) else None,
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise BadResultError(f"unreadable ({err.__class__.__name__}: {err})") from err
    except json.JSONDecodeError as err:
        raise BadResultError(f"invalid JSON ({err})") from err


def _section(result: dict, key: str) -> dict:
    """A nested object of the result; ``upstream`` may also be given as a bare name."""
    value = result.get(key)
    if value is None:
        return {}
    if key == "upstream" and isinstance(value, str):
        return {"name": value}
    if not isinstance(value, dict):
        raise BadResultError(f"{key!r} is not an object")
    return value


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    for col in ("fold", "seed", "best_step", "protocol_folds"):
        df[col] = pd.array(df[col].tolist(), dtype="Int64")
    df["superb_faithful"] = pd.array(df["superb_faithful"].tolist(), dtype="boolean")
    for col in ("learning_rate", "wall_time_s"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df
