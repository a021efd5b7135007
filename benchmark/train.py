"""The one training loop every task uses: explicit, seeded, resumable.

Batch order is a pure function of ``(seed, epoch)`` (weighted dev resamples of ``(seed, step)``), and the torch RNG
state is saved with each checkpoint, so a run resumed from its last checkpoint takes exactly the steps an
uninterrupted run would have taken.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from speechbench.benchmark.config import RunConfig
from speechbench.common import TrainingDivergedError, atomic_path
from speechbench.downstreams.data import bucket_by_duration
from speechbench.downstreams.featurizer import WeightedLayerSum
from speechbench.downstreams.tasks import Task

log = logging.getLogger("speechbench")


class DownstreamModel(nn.Module):
    """WeightedLayerSum + task head: ``hidden [B, L, T, D]`` or pooled ``[B, L, D]`` -> head output."""

    def __init__(self, featurizer: WeightedLayerSum, head: nn.Module):
        super().__init__()
        self.featurizer, self.head = featurizer, head

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor | None) -> Any:
        return self.head(self.featurizer(hidden), lengths)


@dataclass
class TrainState:
    step: int = 0
    best_step: int = -1
    best_dev: float | None = None
    history: list = field(default_factory=list)


class BatchSchedule:
    """Micro-batches of utterance indices for every epoch, a pure function of ``(seed, epoch)``.

    - ``weights`` given: weighted sampling with replacement, ``P(i) = weights[i] / sum(weights)`` (s3prl's
      ``WeightedRandomSampler``); an epoch is ``len(weights)`` draws cut into ``batch_size`` batches, the last
      partial batch dropped (s3prl's ``drop_last``).
    - ``max_batch_s`` None: a seeded permutation cut into ``batch_size`` chunks (a fresh mix every epoch).
    - ``max_batch_s`` set: length buckets capped by ``max_batch_s`` padded seconds (and ``batch_size``), visited in
      a seeded order; utterances of equal duration are ordered at random each epoch, so they do not share the same
      bucket every epoch.
    """

    def __init__(self, durations_s: Sequence[float], batch_size: int, seed: int, max_batch_s: float | None,
                 weights: Sequence[float] | None = None):
        self.durations_s, self.batch_size = list(durations_s), batch_size
        self.seed, self.max_batch_s = seed, max_batch_s
        self.probabilities = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (len(self.durations_s),) or not np.all(w >= 0) or not w.sum() > 0:
                raise ValueError(f"sample weights must be {len(self.durations_s)} non-negative numbers, not all 0")
            self.probabilities = w / w.sum()
        self._epoch, self._batches = -1, []

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n = len(self.durations_s)
            if self.probabilities is not None:
                draws = rng.choice(n, size=n, replace=True, p=self.probabilities).tolist()
                full = max(1, n // self.batch_size) * self.batch_size  # drop_last, but never an empty epoch
                self._batches = [draws[i: i + self.batch_size] for i in range(0, min(full, n), self.batch_size)]
            elif self.max_batch_s is None:
                order = rng.permutation(n).tolist()
                self._batches = [order[i: i + self.batch_size] for i in range(0, n, self.batch_size)]
            else:
                shuffled = rng.permutation(n)  # sort is stable: equal durations keep this random order
                buckets = bucket_by_duration([self.durations_s[i] for i in shuffled], self.max_batch_s,
                                             self.batch_size)
                self._batches = [[int(shuffled[j]) for j in buckets[i]] for i in rng.permutation(len(buckets))]
            self._epoch = epoch
        return self._batches

    def micro_batch(self, index: int) -> list[int]:
        """The ``index``-th micro-batch since the start of training."""
        per_epoch = len(self.epoch_batches(0))
        return self.epoch_batches(index // per_epoch)[index % per_epoch]


def weighted_resample(weights: Sequence[float], seed: int, step: int) -> list[int]:
    """``len(weights)`` indices drawn with replacement in proportion to ``weights``, seeded by ``(seed, step)``:
    the dev draw of s3prl's class-balanced evaluation (a fresh draw at every evaluation), reproducible here."""
    p = np.asarray(weights, dtype=np.float64)
    rng = np.random.default_rng([seed, step, 1])
    return rng.choice(len(p), size=len(p), replace=True, p=p / p.sum()).tolist()


def batches_by_length(task: Task) -> bool:
    """Whether ``task`` trains on length buckets (frame-level tasks, unless they ask for random batches)."""
    return task.granularity == "frames" and task.train_batching == "length_buckets"


def take(targets: Any, indices: Sequence[int]) -> Any:
    if torch.is_tensor(targets):
        return targets[list(indices)]
    return [targets[i] for i in indices]


def atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def build_optimizer(params, cfg: RunConfig) -> torch.optim.Optimizer:
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    return torch.optim.Adam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def evaluate(model: DownstreamModel, task: Task, source, references: Any, batch_size: int,
             max_batch_s: float | None = None) -> tuple[dict, list]:
    """Predict every utterance of ``source`` and score against ``references`` -> (scores, predictions).

    Sources that run the upstream on audio (they expose ``durations_s``) are batched by length under
    ``max_batch_s`` padded seconds; pooled features in fixed-size batches.
    """
    model.eval()
    n = len(source)
    durations_s = getattr(source, "durations_s", None)
    if max_batch_s is not None and durations_s is not None:
        batches = bucket_by_duration(durations_s, max_batch_s, batch_size)
    else:
        batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    predictions: list = [None] * n
    with torch.no_grad():
        for batch in batches:
            hidden, lengths = source.get(batch)
            for i, p in zip(batch, task.predict(model(hidden, lengths), lengths), strict=True):
                predictions[i] = p
    model.train()
    return task.score(predictions, references), predictions


def is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    return best is None or (value > best if higher_is_better else value < best)


def train(model: DownstreamModel, task: Task, cfg: RunConfig, train_source, train_targets: Any,
          train_durations_s: Sequence[float], dev_source, dev_references: list, ckpt_dir: Path,
          length_buckets: bool = False, on_checkpoint: Callable[[int], None] | None = None,
          train_weights: Sequence[float] | None = None, dev_weights: Sequence[float] | None = None) -> TrainState:
    """Train ``model`` for ``cfg.train.max_steps`` updates, keeping the best dev checkpoint in ``ckpt_dir/best.pt``.

    ``length_buckets``: batch by length under ``train.max_batch_s`` (frame features), else random batches.
    ``train_weights``: draw training batches by weighted sampling (see :class:`BatchSchedule`). ``dev_weights``:
    select on the dev score of a weighted resample of the dev set, drawn afresh at every evaluation from
    ``(seed, step)`` (s3prl's class-balanced dev loader for KS); the plain dev score is kept in the history.
    Resumes from ``ckpt_dir/last.pt`` when it exists. Returns the final state (best step and dev value).
    """
    tc = cfg.train
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    state = TrainState()
    last = ckpt_dir / "last.pt"
    if last.exists():
        ckpt = torch.load(last, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = TrainState(ckpt["step"], ckpt["best_step"], ckpt["best_dev"], list(ckpt["history"]))
        log.info("resumed from %s at step %d (best dev %s at step %d)", last, state.step, state.best_dev,
                 state.best_step)
    schedule = BatchSchedule(train_durations_s, tc.batch_size, tc.seed, tc.max_batch_s if length_buckets else None,
                             train_weights)
    model.train()
    bar = tqdm(total=tc.max_steps, initial=state.step, desc="train", unit="step", disable=None)
    running = []
    while state.step < tc.max_steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for k in range(tc.grad_accum):
            draw = state.step * tc.grad_accum + k
            batch = schedule.micro_batch(draw)
            hidden, lengths = train_source.get(batch, draw=draw)
            loss = task.loss(model(hidden, lengths), take(train_targets, batch)) / tc.grad_accum
            loss.backward()
            step_loss += loss.item()
        if not np.isfinite(step_loss):
            raise TrainingDivergedError(f"loss became {step_loss} at step {state.step + 1}; lower the learning rate")
        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        state.step += 1
        running.append(step_loss)
        bar.update(1)
        if state.step % tc.log_every == 0:
            bar.set_postfix(loss=f"{np.mean(running):.4f}")
            log.debug("step %d loss %.4f", state.step, np.mean(running))
            running = []
        if state.step % tc.eval_every == 0 or state.step == tc.max_steps:
            scores, predictions = evaluate(model, task, dev_source, dev_references, tc.eval_batch_size,
                                           tc.max_batch_s)
            record = {"step": state.step, "loss": step_loss, f"dev_{task.metric}": scores[task.metric]}
            if dev_weights is not None:
                draw = weighted_resample(dev_weights, tc.seed, state.step)
                scores = task.score([predictions[i] for i in draw], [dev_references[i] for i in draw])
                record[f"dev_{task.metric}_all"] = record[f"dev_{task.metric}"]
                record[f"dev_{task.metric}"] = scores[task.metric]
            value = scores[task.metric]
            improved = is_better(value, state.best_dev, task.higher_is_better)
            if improved:
                state.best_dev, state.best_step = value, state.step
                atomic_torch_save(model.state_dict(), ckpt_dir / "best.pt")
            state.history.append(record)
            log.info("step %d/%d  loss %.4f  dev %s %.2f%s%s", state.step, tc.max_steps, step_loss, task.metric,
                     value, task.unit, "  (best)" if improved else "")
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "torch_rng": torch.get_rng_state(), "step": state.step,
                               "best_step": state.best_step, "best_dev": state.best_dev,
                               "history": state.history}, last)
            if on_checkpoint is not None:
                on_checkpoint(state.step)
    bar.close()
    return state
