"""Reading a run's per-item test outcomes (``items.jsonl`` beside its ``result.json``) into :class:`ItemScores`.

``bench run`` writes the file through the task's ``item_scores`` hook (``downstreams/tasks.py``); this module only
reads it, so the leaderboard needs no task code and no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from speechbench.common import SpeechbenchError
from speechbench.leaderboard.stats import ItemScores, ItemScoresError, item_scores

ITEMS_FILENAME = "items.jsonl"


class ItemsError(SpeechbenchError, ValueError):
    """A run's per-item file is missing or unusable; the message names the file and the problem."""


def items_path(result_path: str | Path) -> Path:
    """``.../<run id>/result.json -> .../<run id>/items.jsonl``."""
    return Path(result_path).with_name(ITEMS_FILENAME)


def read_items(result_path: str | Path) -> ItemScores:
    """The per-item outcomes of the run whose ``result.json`` is ``result_path``; :class:`ItemsError` if missing
    (a run from before per-item files) or malformed."""
    path = items_path(result_path)
    if not path.is_file():
        raise ItemsError(f"{path}: no per-item scores (the run predates them or its task has no item_scores hook); "
                         f"rerun it with 'bench rerun {result_path}'")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ItemsError(f"{path}: unreadable ({e.__class__.__name__}: {e})") from None
    records = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ItemsError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
    try:
        return item_scores(records, str(path))
    except ItemScoresError as e:
        raise ItemsError(str(e)) from None
