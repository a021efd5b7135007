"""The one generic pretraining loop: random crops in, objective loss out, resumable, atomic checkpoints.

Layout of an output directory ``OUT``:

- ``OUT/upstream/``: the trained upstream in the format the loaders read (``bench run --upstream OUT/upstream``),
  replaced at every save by a complete new copy (written beside it, then swapped in);
- ``OUT/state.pt``: everything needed to resume (objective weights and buffers, optimiser, step, torch RNG), written
  to a temporary file and renamed;
- ``OUT/log.jsonl``: one line per ``log_every`` steps (loss, learning rate, objective statistics, audio seconds per
  wall second);
- ``OUT/pretrain.json``: the resolved configuration; a rerun into the same directory resumes only when it matches
  (``train.max_steps`` may grow).

Batches are a pure function of ``(seed, step)`` (utterances and crop offsets drawn by a NumPy generator seeded with
both), and the torch RNG (masks, negatives, dropout) is checkpointed, so a resumed run takes the steps an
uninterrupted one would have taken.

**Device, precision, torchrun** (:class:`speechbench.runtime.Runtime`): the objective and its batches live on the
device; the forward pass runs under ``torch.autocast`` for bf16/fp16 (fp16 with a checkpointed grad scaler). Under
torchrun the objective is wrapped in ``DistributedDataParallel``: every rank draws the same global batch and trains
on its rows (:func:`speechbench.runtime.rank_slice`), its loss weighted by its share so that the averaged gradient is
that of the whole batch's mean. For an objective whose loss is a mean over equal crops and draws nothing at random
(APC) this is the single-process run to float rounding; masks, negatives and codebook statistics (CPC, wav2vec 2.0,
HuBERT) are drawn per rank from its own part, as in fairseq's data-parallel training. Rank 0 alone writes the
state, the log and the upstream, with every rank's RNG state.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from speechbench.common import SAMPLE_RATE, TrainingDivergedError
from speechbench.runtime import Progress, Runtime, all_gather_objects, all_reduce_sum, barrier, rank_slice
from speechbench.upstreams.checkpoints import PRETRAIN_CONFIG, PRETRAIN_UPSTREAM_DIR, CheckpointError
from speechbench.upstreams.pretrain.base import Objective

log = logging.getLogger("speechbench")

STATE_FILE, LOG_FILE = "state.pt", "log.jsonl"
CONFIG_FILE, UPSTREAM_DIR = PRETRAIN_CONFIG, PRETRAIN_UPSTREAM_DIR  # checkpoint detection knows these names
_TRAIN_STREAM, _PREPARE_STREAM = 0, 1  # separate NumPy streams for training batches and prepare() batches


@dataclass(frozen=True)
class PretrainOptim:
    lr: float = 5.0e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.01
    betas: tuple[float, ...] = (0.9, 0.98)
    warmup_steps: int = 200  # linear warm-up from 0 to lr
    schedule: str = "linear"  # after warm-up: linear (to 0 at max_steps) | cosine | constant
    grad_clip: float = 5.0


@dataclass(frozen=True)
class PretrainTrain:
    max_steps: int = 4000  # optimiser updates
    batch_size: int = 16  # crops per step
    crop_s: float = 2.0  # crop length; a batch is cropped to its shortest utterance when that is shorter
    save_every: int = 500  # steps between checkpoints (state.pt and upstream/)
    log_every: int = 25
    seed: int = 0
    prepare_batches: int = 64  # batches handed to the objective's prepare() (e.g. HuBERT's k-means)


@dataclass(frozen=True)
class AudioSource:
    """Training audio: paths with their lengths in samples, and the function that loads one as float32 ``[S]``."""

    paths: Sequence[str]
    num_samples: Sequence[int]
    load: Callable[[str], np.ndarray]

    @functools.cached_property
    def length_order(self) -> np.ndarray:
        """Utterance indices sorted by length (stable, so the order is reproducible)."""
        return np.argsort(np.asarray(self.num_samples), kind="stable")

    @property
    def hours(self) -> float:
        return float(np.sum(self.num_samples)) / SAMPLE_RATE / 3600


@dataclass
class PretrainSummary:
    steps: int
    resumed_from: int
    final_loss: float
    audio_s_per_s: float
    wall_s: float
    upstream_dir: Path


def draw_batch(source: AudioSource, rng: np.random.Generator, batch_size: int, crop_s: float,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` utterances of similar length, each cut at a random offset to a common length.

    Returns ``wavs [B, S]`` and ``wav_lengths [B]`` (all ``S``), with ``S = min(crop_s * 16000, shortest chosen
    utterance)``: a batch carries no padding, as fairseq crops. The utterances are drawn from a window of
    ``4 * batch_size`` neighbours in length order around a random one, so that a corpus mixing 1 s words with long
    sentences does not cut every batch down to its shortest clip.
    """
    order = source.length_order
    window = min(len(order), 4 * batch_size)
    start = int(rng.integers(0, len(order) - window + 1))
    picks = rng.choice(window, size=batch_size, replace=window < batch_size)
    index = [int(order[start + k]) for k in picks]
    crop = min(round(crop_s * SAMPLE_RATE), min(int(source.num_samples[i]) for i in index))
    wavs = np.zeros((batch_size, crop), dtype=np.float32)
    for row, i in enumerate(index):
        audio = source.load(source.paths[i])
        offset = int(rng.integers(0, len(audio) - crop + 1)) if len(audio) > crop else 0
        piece = audio[offset: offset + crop]
        wavs[row, : len(piece)] = piece
    return torch.from_numpy(wavs), torch.full((batch_size,), crop, dtype=torch.long)


def step_batch(source: AudioSource, train: PretrainTrain, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of ``step``: a pure function of ``(train.seed, step)``."""
    return draw_batch(source, np.random.default_rng([train.seed, _TRAIN_STREAM, step]), train.batch_size,
                      train.crop_s)


def prepare_batches(source: AudioSource, train: PretrainTrain) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(train.prepare_batches):
        yield draw_batch(source, np.random.default_rng([train.seed, _PREPARE_STREAM, i]), train.batch_size,
                         train.crop_s)


def lr_factor(step: int, optim: PretrainOptim, max_steps: int) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based update index)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    if optim.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def _atomic_torch_save(obj: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_upstream(objective: Objective, out_dir: Path, meta: dict) -> Path:
    """Write the upstream into ``out_dir/upstream`` as a whole: a new copy is completed beside it, then swapped in."""
    final = out_dir / UPSTREAM_DIR
    fresh = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{UPSTREAM_DIR}.new."))
    objective.export(fresh, meta)
    old = out_dir / f".{UPSTREAM_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    fresh.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _recover_upstream(out_dir: Path) -> None:
    """After a crash between the two renames of :func:`export_upstream`, put the previous copy back."""
    old = out_dir / f".{UPSTREAM_DIR}.old"
    if old.exists() and not (out_dir / UPSTREAM_DIR).exists():
        old.rename(out_dir / UPSTREAM_DIR)
    for stale in out_dir.glob(f".{UPSTREAM_DIR}.new.*"):
        shutil.rmtree(stale, ignore_errors=True)


def _check_config(out_dir: Path, config: dict) -> bool:
    """True when ``out_dir`` holds a run of this configuration to resume; error when it holds another one."""
    path = out_dir / CONFIG_FILE
    if not path.exists():
        return False
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}); remove {out_dir} or pass another --out") \
            from None

    def comparable(c: dict) -> str:
        c = json.loads(json.dumps(c))
        c.get("train", {}).pop("max_steps", None)
        runtime = c.pop("runtime", None) or {}  # the device may change on resume; fp32 is what older runs used
        if runtime.get("precision", "fp32") != "fp32":
            c["precision"] = runtime["precision"]
        return json.dumps(c, sort_keys=True)

    if comparable(saved) != comparable(config):
        raise CheckpointError(f"{path}: {out_dir} holds a pretraining run with a different configuration; pass another "
                         f"--out (only train.max_steps may change on resume)")
    return True


def _trim_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (they will be written again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            break  # a line cut by the interruption
    path.write_text("".join(f"{line}\n" for line in keep))


def _rng_states(runtime: Runtime) -> list[dict]:
    """Every rank's torch RNG state (CPU, and CUDA on a GPU), in rank order (a collective under torchrun)."""
    state = {"cpu": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return all_gather_objects(state)


def _restore_rng(state: dict, runtime: Runtime) -> None:
    ranks = state.get("rng_ranks") or [{"cpu": state["torch_rng"], **({"cuda": state["cuda_rng"]}
                                                                       if "cuda_rng" in state else {})}]
    if len(ranks) == runtime.dist.world_size or runtime.dist.main:
        mine = ranks[runtime.dist.rank] if len(ranks) == runtime.dist.world_size else ranks[0]
        torch.set_rng_state(mine["cpu"].cpu())
        if "cuda" in mine and runtime.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"].cpu(), runtime.device)


def pretrain(objective: Objective, source: AudioSource, optim: PretrainOptim, train: PretrainTrain,
             out_dir: str | os.PathLike, config: dict, meta: dict, progress: bool = True,
             runtime: Runtime | None = None) -> PretrainSummary:
    """Train ``objective`` on random crops of ``source`` for ``train.max_steps`` updates, resuming from ``out_dir``.

    ``config`` (the resolved recipe) is saved as ``pretrain.json``; ``meta`` goes into the exported upstream's
    ``speechbench.json`` (with the step added). ``runtime``: device, precision and torchrun place (module
    docstring); default one CPU process in fp32.
    """
    runtime = runtime or Runtime()
    dist, device = runtime.dist, runtime.device
    out_dir = Path(out_dir)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if not source.paths:
        raise CheckpointError("no training audio (the data source lists no utterances)")
    resuming = _check_config(out_dir, config) and (out_dir / STATE_FILE).exists()
    barrier()  # every rank has decided whether it resumes before rank 0 writes anything
    if dist.main:
        _recover_upstream(out_dir)
    objective.to(device)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.precision == "fp16")
    step = 0
    if resuming:
        state = torch.load(out_dir / STATE_FILE, map_location=device, weights_only=True)
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        _restore_rng(state, runtime)
        step = int(state["step"])
        log.info("resuming %s from step %d", out_dir, step)
        if dist.main:
            _trim_log(out_dir / LOG_FILE, step)
    else:
        if dist.main:
            (out_dir / LOG_FILE).unlink(missing_ok=True)
        objective.train()
        # every rank prepares from the same batches (deterministic), so every rank holds the same state
        objective.prepare(((w.to(device), n.to(device)) for w, n in prepare_batches(source, train)), log.info)
        if dist.main:
            (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    resumed_from = step
    net: torch.nn.Module = objective
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
        if not resuming:
            torch.manual_seed(train.seed + 7919 * dist.rank)  # each rank its own masks and negatives

    def save(step: int) -> None:
        rngs = _rng_states(runtime)
        if not dist.main:
            return
        state = {"objective": objective.state_dict(), "optimizer": optimizer.state_dict(),
                 "torch_rng": rngs[0]["cpu"], "step": step}
        if "cuda" in rngs[0]:
            state["cuda_rng"] = rngs[0]["cuda"]
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        if dist.enabled:
            state["rng_ranks"] = rngs
        _atomic_torch_save(state, out_dir / STATE_FILE)
        export_upstream(objective, out_dir, {**meta, "step": step})

    objective.train()
    t0, audio_s, last_loss = time.perf_counter(), 0.0, float("nan")
    bar = Progress(train.max_steps, f"pretrain {objective.family}", "step", initial=step, enabled=progress)
    log_file = open(out_dir / LOG_FILE, "a", encoding="utf-8") if dist.main else None
    try:
        while step < train.max_steps:
            wavs, lengths = step_batch(source, train, step)
            part = rank_slice(len(wavs), dist)
            share = (part.stop - part.start) / len(wavs)
            rows = part if share else slice(0, 1)  # an empty part joins the all-reduce with weight 0
            for group in optimizer.param_groups:
                group["lr"] = optim.lr * lr_factor(step, optim, train.max_steps)
            with runtime.autocast():
                out = net(wavs[rows].to(device, non_blocking=True), lengths[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out.loss * (share * dist.world_size)).backward()
            loss_t = out.loss.detach().float() * share
            if dist.enabled:  # the whole batch's loss: every rank sees the same value (and the same NaN)
                loss_t = all_reduce_sum(loss_t.double())
            loss = float(loss_t)
            if not math.isfinite(loss):
                raise TrainingDivergedError(f"pretraining {objective.family}: loss is {loss} at step {step + 1} "
                                            f"(lower optim.lr or raise optim.warmup_steps); last good checkpoint in "
                                            f"{out_dir}")
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, optim.grad_clip))
            scaler.step(optimizer)
            scaler.update()
            step += 1
            last_loss = loss
            audio_s += float(lengths.sum()) / SAMPLE_RATE
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if log_file is not None and (step % train.log_every == 0 or step == train.max_steps):
                elapsed = time.perf_counter() - t0
                row = {"step": step, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                       **{k: float(v) for k, v in out.stats.items()}, "audio_s_per_s": audio_s / max(elapsed, 1e-9)}
                log_file.write(json.dumps(row) + "\n")
                log_file.flush()
            if step % train.save_every == 0 or step == train.max_steps:
                save(step)
    finally:
        if log_file is not None:
            log_file.close()
    bar.close()
    if step == resumed_from and not (out_dir / UPSTREAM_DIR).exists():
        save(step)  # max_steps reached before this call (or 0): still leave a loadable upstream
    barrier()  # rank 0's upstream is complete before any rank returns it
    wall = time.perf_counter() - t0
    return PretrainSummary(step, resumed_from, last_loss, audio_s / max(wall, 1e-9), wall, out_dir / UPSTREAM_DIR)
