"""Naming of task-metric columns and the direction of known metrics.

The seven SUPERB tasks use the reference CSV's column names (``PR_per``, ``KS_acc``, ``IC_acc``, ``SID_acc``,
``ER_acc``, ``ASR_wer``, ``ASV_eer``): the upper-cased task name, ``_``, and the metric's short name. Any other
task gets ``f"{task}_{metric}"`` unchanged, so new tasks work without touching this file.
"""

from __future__ import annotations

# The paper's column order.
SUPERB_TASKS: tuple[str, ...] = ("pr", "ks", "ic", "sid", "er", "asr", "asv")

_SHORT_METRIC = {"accuracy": "acc"}

# Whether higher is better, by short metric name; used only where a file or a reference set does not say.
KNOWN_DIRECTIONS: dict[str, bool] = {"acc": True, "f1": True, "per": False, "wer": False, "cer": False,
                                     "eer": False, "der": False}


def metric_column(task: str, metric: str) -> str:
    """The wide-table column of a (task, metric): ``("ks", "accuracy") -> "KS_acc"``, ``("sd", "der") -> "sd_der"``."""
    if task.lower() in SUPERB_TASKS:
        short = metric.lower()
        return f"{task.upper()}_{_SHORT_METRIC.get(short, short)}"
    return f"{task}_{metric}"


def metric_direction(metric: str) -> bool | None:
    """Higher-is-better for a known metric name (``accuracy``, ``acc``, ``wer``, ...), else None."""
    short = metric.lower()
    return KNOWN_DIRECTIONS.get(_SHORT_METRIC.get(short, short))


def column_direction(column: str) -> bool | None:
    """Higher-is-better for a column named ``<task>_<metric>`` with a known metric, else None."""
    return metric_direction(column.rsplit("_", 1)[-1])


def column_order(columns: list[str]) -> list[str]:
    """SUPERB columns in the paper's order, then any others alphabetically."""
    rank = {task.upper(): i for i, task in enumerate(SUPERB_TASKS)}
    return sorted(columns, key=lambda c: (rank.get(c.split("_", 1)[0], len(rank)), c))
