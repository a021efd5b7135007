"""The one training loop every task uses: explicit, seeded, resumable, on one device or several processes.

Batch order is a pure function of ``(seed, epoch)`` (weighted dev resamples of ``(seed, step)``), and the torch RNG
state is saved with each checkpoint, so a run resumed from its last checkpoint takes exactly the steps an
uninterrupted run would have taken.

**Device and precision** (:class:`speechbench.runtime.Runtime`): features and targets are moved to the device, the
forward pass and the loss run under ``torch.autocast`` for bf16/fp16, and fp16 scales the loss with a
``torch.amp.GradScaler`` whose state is checkpointed.

**torchrun.** The model is wrapped in ``DistributedDataParallel``. Every rank draws the same global micro-batch from
the schedule and takes its contiguous part of it (:func:`speechbench.runtime.rank_slice`). A task's loss is a mean
over the utterances of a batch, so rank ``r`` scales its part's mean by ``n_r / n * world_size``; DDP's gradient
average then equals the gradient of the whole micro-batch's mean, and N processes take the steps one process takes
(to float rounding; heads with dropout or SpecAugment draw their masks from each rank's own generator, and batch
norm sees each rank's part). A rank whose part is empty runs one utterance with weight 0, so that it still joins
the gradient all-reduce. Evaluation shards the batches over the ranks and gathers the predictions in the original
order. Only rank 0 writes checkpoints (with every rank's RNG state).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from speechbench.benchmark.config import RunConfig
from speechbench.common import TrainingDivergedError, atomic_path
from speechbench.downstreams.data import bucket_by_duration
from speechbench.downstreams.featurizer import WeightedLayerSum
from speechbench.downstreams.tasks import Task
from speechbench.runtime import Progress, Runtime, all_gather_objects, all_reduce_sum, barrier, rank_slice, to_device

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
             max_batch_s: float | None = None, runtime: Runtime | None = None) -> tuple[dict, list]:
    """Predict every utterance of ``source`` and score against ``references`` -> (scores, predictions).

    Sources that run the upstream on audio (they expose ``durations_s``) are batched by length under
    ``max_batch_s`` padded seconds; pooled features in fixed-size batches. Under torchrun the batches are dealt
    round-robin to the ranks and the predictions gathered, so every rank returns the same scores and predictions
    (in the source's order), and each batch is the batch one process would have run.
    """
    runtime = runtime or Runtime()
    model.eval()
    n = len(source)
    durations_s = getattr(source, "durations_s", None)
    if max_batch_s is not None and durations_s is not None:
        batches = bucket_by_duration(durations_s, max_batch_s, batch_size)
    else:
        batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    mine: list[tuple[int, Any]] = []
    with torch.no_grad():
        for batch in batches[runtime.dist.rank::runtime.dist.world_size]:
            hidden, lengths = to_device(source.get(batch), runtime.device)
            with runtime.autocast():
                output = model(hidden, lengths)
            mine += zip(batch, task.predict(output, lengths), strict=True)
    predictions: list = [None] * n
    for part in all_gather_objects(mine):
        for i, p in part:
            predictions[i] = p
    model.train()
    return task.score(predictions, references), predictions


def is_better(value: float, best: float | None, higher_is_better: bool) -> bool:
    return best is None or (value > best if higher_is_better else value < best)


def _rng_state(runtime: Runtime) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def _set_rng_state(state: dict, runtime: Runtime) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], runtime.device)


def _wrap(model: DownstreamModel, runtime: Runtime) -> nn.Module:
    """The module the training steps call: ``DistributedDataParallel`` around the model under torchrun (which
    also makes every rank start from rank 0's weights), else the model itself."""
    if not runtime.dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # the layer weights get no gradient when there is one layer or one probed layer (--layer): DDP must then look for
    # unused parameters at every step, which it otherwise need not (and warns about)
    unused = model.featurizer.layer is not None or model.featurizer.num_layers == 1
    return DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                                   find_unused_parameters=unused)


def train(model: DownstreamModel, task: Task, cfg: RunConfig, train_source, train_targets: Any,
          train_durations_s: Sequence[float], dev_source, dev_references: list, ckpt_dir: Path,
          length_buckets: bool = False, on_checkpoint: Callable[[int], None] | None = None,
          train_weights: Sequence[float] | None = None, dev_weights: Sequence[float] | None = None,
          runtime: Runtime | None = None) -> TrainState:
    """Train ``model`` for ``cfg.train.max_steps`` updates, keeping the best dev checkpoint in ``ckpt_dir/best.pt``.

    ``length_buckets``: batch by length under ``train.max_batch_s`` (frame features), else random batches.
    ``train_weights``: draw training batches by weighted sampling (see :class:`BatchSchedule`). ``dev_weights``:
    select on the dev score of a weighted resample of the dev set, drawn afresh at every evaluation from
    ``(seed, step)`` (s3prl's class-balanced dev loader for KS); the plain dev score is kept in the history.
    ``runtime``: device, precision and torchrun place (module docstring); default one CPU process in fp32.
    Resumes from ``ckpt_dir/last.pt`` when it exists. Returns the final state (best step and dev value).
    """
    tc, runtime = cfg.train, runtime or Runtime()
    dist, device = runtime.dist, runtime.device
    if dist.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tc.seed)
    model.to(device)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.precision == "fp16")
    state = TrainState()
    last = ckpt_dir / "last.pt"
    net = _wrap(model, runtime)
    if dist.rank:  # the other ranks draw their own dropout and SpecAugment masks
        torch.manual_seed(tc.seed + 7919 * dist.rank)
    if last.exists():
        ckpt = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        ranks = ckpt.get("rng_ranks") or [{"cpu": ckpt["torch_rng"], **({"cuda": ckpt["cuda_rng"]}
                                                                         if "cuda_rng" in ckpt else {})}]
        if dist.rank < len(ranks) and len(ranks) == dist.world_size:
            _set_rng_state({k: v.cpu() for k, v in ranks[dist.rank].items()}, runtime)
        elif dist.main:
            _set_rng_state({k: v.cpu() for k, v in ranks[0].items()}, runtime)
        state = TrainState(ckpt["step"], ckpt["best_step"], ckpt["best_dev"], list(ckpt["history"]))
        log.info("resumed from %s at step %d (best dev %s at step %d)", last, state.step, state.best_dev,
                 state.best_step)
        barrier()  # every rank has read last.pt before rank 0 may write the next one
    schedule = BatchSchedule(train_durations_s, tc.batch_size, tc.seed, tc.max_batch_s if length_buckets else None,
                             train_weights)
    model.train()
    bar = Progress(tc.max_steps, "train", "step", initial=state.step)
    running = []
    while state.step < tc.max_steps:
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for k in range(tc.grad_accum):
            draw = state.step * tc.grad_accum + k
            batch = schedule.micro_batch(draw)
            part = rank_slice(len(batch), dist)
            share = (part.stop - part.start) / len(batch)
            if share == 0:  # more ranks than utterances: join the all-reduce with one utterance, weighted 0
                part = slice(0, 1)
            # one process asks for the whole batch (a source needs no ``part`` argument unless it runs under torchrun)
            got = train_source.get(batch, draw=draw, part=part) if dist.enabled else train_source.get(batch, draw=draw)
            hidden, lengths = to_device(got, device)
            targets = to_device(take(train_targets, batch[part]), device)
            sync = k == tc.grad_accum - 1 or not dist.enabled
            with contextlib.nullcontext() if sync else net.no_sync(), runtime.autocast():
                loss = task.loss(net(hidden, lengths), targets)
            weight = share * dist.world_size  # 1.0 for one process: the loss exactly as computed
            scaler.scale(loss * weight / tc.grad_accum).backward()
            losses.append(loss.detach().float() * share / tc.grad_accum)
        step_losses = torch.stack(losses)
        if dist.enabled:  # the whole micro-batches' loss: every rank sees the same value (and the same NaN)
            step_losses = all_reduce_sum(step_losses.double())
        step_loss = sum(step_losses.tolist())
        if not np.isfinite(step_loss):
            raise TrainingDivergedError(f"loss became {step_loss} at step {state.step + 1}; lower the learning rate")
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        state.step += 1
        running.append(step_loss)
        bar.update(1)
        if state.step % tc.log_every == 0:
            bar.set_postfix(loss=f"{np.mean(running):.4f}")
            log.debug("step %d loss %.4f", state.step, np.mean(running))
            running = []
        if state.step % tc.eval_every == 0 or state.step == tc.max_steps:
            scores, predictions = evaluate(model, task, dev_source, dev_references, tc.eval_batch_size,
                                           tc.max_batch_s, runtime)
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
                if dist.main:
                    atomic_torch_save(model.state_dict(), ckpt_dir / "best.pt")
            state.history.append(record)
            log.info("step %d/%d  loss %.4f  dev %s %.2f%s%s", state.step, tc.max_steps, step_loss, task.metric,
                     value, task.unit, "  (best)" if improved else "")
            rngs = all_gather_objects(_rng_state(runtime))
            if dist.main:
                ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "torch_rng": rngs[0]["cpu"], "step": state.step, "best_step": state.best_step,
                        "best_dev": state.best_dev, "history": state.history}
                if scaler.is_enabled():
                    ckpt["scaler"] = scaler.state_dict()
                if "cuda" in rngs[0]:
                    ckpt["cuda_rng"] = rngs[0]["cuda"]
                if dist.enabled:
                    ckpt["rng_ranks"] = rngs
                atomic_torch_save(ckpt, last)
            if on_checkpoint is not None:
                on_checkpoint(state.step)
    bar.close()
    barrier()  # rank 0's best.pt is complete before any rank reads it
    return state
