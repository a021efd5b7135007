"""The task contract and registry.

A task is one module (``downstreams/ks.py`` ...) that builds a :class:`Task` from plain functions and registers it
with ``@register_task``-style ``register_task(Task(...))``. Tasks never import each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from speechbench.common import UnknownNameError
from speechbench.downstreams.data import Utterance


@dataclass(frozen=True)
class PreparedData:
    """A task's data, ready to train on: utterances per split plus what the head needs to know.

    ``audio_root``: manifest paths are relative to it. ``corpus``: ``"synth"`` or the real corpus name.
    ``label_space``: task-specific (e.g. the class list), used to build the head and to encode targets.
    """

    audio_root: Path
    splits: dict[str, list[Utterance]]
    corpus: str
    label_space: Any = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """Everything the runner needs to know about one downstream task.

    prepare(data_cfg, options) -> PreparedData
    targets(utterances, prepared) -> Tensor or list: training targets, indexable by utterance position
    build_head(input_dim, prepared, options) -> nn.Module with forward(x, lengths):
        x is ``[B, T, D]`` frames with ``lengths [B]``, or ``[B, D]`` pooled features with ``lengths=None``
    loss(output, targets) -> scalar Tensor: a mean over the utterances of the batch (a torchrun rank weights its part
        of a batch by its share, which is exact only for a mean); targets arrive on the features' device
    predict(output, lengths) -> list of predictions (one per utterance)
    references(utterances, prepared) -> list of references, same form as predictions
    score(predictions, references) -> dict with at least ``metric`` (value in ``unit``); ``references`` is
        whatever ``references()`` returned (a list of labels, or e.g. a trial list for verification)
    train_crop_s(options) -> seconds or None: random crops of the training audio (e.g. SID's 8 s crops); a task
        that crops cannot train on pooled features (the crop changes the time-mean)
    write_outputs(run_dir, utterances, predictions, references) -> None: audit files of the test predictions
        (default: ``predictions.tsv`` with id, prediction, reference)
    item_scores(predictions, references, utterances) -> list of dicts: the per-item test outcomes a bootstrap
        needs, one dict per test item, written to ``items.jsonl`` beside ``result.json`` (the leaderboard reads it,
        so it needs no task code). Three shapes, told apart by their keys: ``{"id", "correct"}`` (accuracy),
        ``{"id", "edits", "ref_len"}`` (corpus-level error rates), ``{"id", "label", "score", "enroll_speaker",
        "test_speaker"}`` (verification trials). None: no per-item file, so no interval for this task.
    sample_weights(utterances, prepared, options) -> list of floats or None: draw training batches (and score the
        dev set) by weighted sampling with replacement, in proportion to these weights (KS: class-balanced, as
        s3prl's ``WeightedRandomSampler``); None or no hook: every epoch visits each utterance once
    train_batching: frame-level tasks only: ``"length_buckets"`` (similar lengths together, capped by
        ``train.max_batch_s``) or ``"random"`` (a fresh random permutation cut into ``train.batch_size`` batches
        every epoch, as s3prl's shuffled DataLoader: ASV)
    protocol(prepared, options) -> (facts, deviations): the protocol facts a result records (phone set, trial list,
        sampling, official test size ...) and the run-time deviations from the SUPERB protocol they reveal
    """

    name: str
    metric: str
    unit: str
    higher_is_better: bool
    granularity: str  # "pooled" (utterance-level head, exact on time-means) | "frames"
    options_cls: type
    prepare: Callable[..., PreparedData]
    targets: Callable[[Sequence[Utterance], PreparedData], Any]
    build_head: Callable[[int, PreparedData, Any], torch.nn.Module]
    loss: Callable[[Any, Any], torch.Tensor]
    predict: Callable[[Any, torch.Tensor | None], list]
    references: Callable[[Sequence[Utterance], PreparedData], list]
    score: Callable[[list, list], dict]
    summary: str = ""
    real_corpus: str = ""
    folds: tuple[int, ...] = ()  # tasks evaluated over several folds (ER); options_cls then has a `fold` field
    train_crop_s: Callable[[Any], float | None] | None = None
    write_outputs: Callable[[Path, Sequence[Utterance], list, Any], None] | None = None
    item_scores: Callable[[list, Any, Sequence[Utterance]], list[dict]] | None = None
    sample_weights: Callable[[Sequence[Utterance], PreparedData, Any], list[float] | None] | None = None
    train_batching: str = "length_buckets"
    protocol: Callable[[PreparedData, Any], tuple[dict, list[str]]] | None = None


def write_predictions_tsv(run_dir: Path, utterances: Sequence[Utterance], predictions: list, references) -> None:
    """Default audit file: ``predictions.tsv`` with one ``id<TAB>prediction<TAB>reference`` line per utterance."""
    from speechbench.common import atomic_write_text

    atomic_write_text(run_dir / "predictions.tsv", "".join(
        f"{u.id}\t{p}\t{r}\n" for u, p, r in zip(utterances, predictions, references, strict=True)))


def correct_items(predictions: list, references: Sequence, utterances: Sequence[Utterance]) -> list[dict]:
    """Per-item outcome of an accuracy task: ``{"id", "correct": 1|0}`` (structured labels compare as tuples)."""
    return [{"id": u.id, "correct": int(_as_key(p) == _as_key(r))}
            for u, p, r in zip(utterances, predictions, references, strict=True)]


def edit_items(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]],
               utterances: Sequence[Utterance]) -> list[dict]:
    """Per-item outcome of a corpus-level error rate: ``{"id", "edits", "ref_len"}`` over token sequences (words
    for WER, phones for PER); summing edits and reference lengths over any subset gives its corpus-level rate."""
    from speechbench.downstreams.metrics import edit_count

    return [{"id": u.id, "edits": edit_count(h, r), "ref_len": len(r)}
            for u, h, r in zip(utterances, hypotheses, references, strict=True)]


def _as_key(label):
    return tuple(label) if isinstance(label, (list, tuple)) else label


ITEMS_FILENAME = "items.jsonl"


def write_items(path: Path, items: list[dict]) -> dict:
    """Write the per-item outcomes as JSON lines (atomically); return the record that ``result.json`` keeps:
    ``{"file", "count", "ids_sha256"}`` (sha256 of the item ids in file order, one per line)."""
    import json

    from speechbench.common import atomic_write_text, sha256_text

    atomic_write_text(path, "".join(json.dumps(item, separators=(",", ":")) + "\n" for item in items))
    return {"file": path.name, "count": len(items), "ids_sha256": sha256_text("\n".join(str(i["id"]) for i in items))}


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is registered twice")
    if task.granularity not in ("pooled", "frames"):
        raise ValueError(f"task {task.name!r}: granularity must be pooled or frames")
    if task.train_batching not in ("length_buckets", "random"):
        raise ValueError(f"task {task.name!r}: train_batching must be length_buckets or random")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    _load_builtin_tasks()
    if name not in TASKS:
        raise UnknownNameError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def list_tasks() -> list[Task]:
    _load_builtin_tasks()
    return [TASKS[n] for n in sorted(TASKS)]


def _load_builtin_tasks() -> None:
    # Importing a task module registers it; one line per task keeps "adding a task" to its own module + this list.
    import speechbench.downstreams.asr  # noqa: F401
    import speechbench.downstreams.asv  # noqa: F401
    import speechbench.downstreams.er  # noqa: F401
    import speechbench.downstreams.ic  # noqa: F401
    import speechbench.downstreams.ks  # noqa: F401
    import speechbench.downstreams.pr  # noqa: F401
    import speechbench.downstreams.sid  # noqa: F401
