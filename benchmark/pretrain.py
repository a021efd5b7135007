"""``bench pretrain``: recipe -> objective + training audio -> the generic loop in :mod:`upstreams.pretrain.loop`.

A pretraining recipe (``recipes/pretrain/<name>.yaml``) has the sections ``data``, ``optim``, ``train``,
``runtime`` (fixed schema below and in :mod:`upstreams.pretrain.loop`) and two family sections parsed by the family's
own dataclasses: ``model`` (architecture) and ``objective`` (loss settings). Overrides are ``key.sub=value`` as for
``bench run``; ``--device`` and ``--precision`` set ``runtime.device`` and ``runtime.precision``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speechbench.benchmark.config import (
    ConfigError,
    RuntimeConfig,
    apply_overrides,
    check_runtime,
    find_recipe,
    from_dict,
    identity_dict,
    load_raw_recipe,
)
from speechbench.benchmark.results import git_sha
from speechbench.common import SAMPLE_RATE
from speechbench.downstreams.data import DataError, Utterance, load_audio, read_manifest, resolve_audio_path
from speechbench.runtime import make_runtime
from speechbench.upstreams.pretrain.base import get_objective
from speechbench.upstreams.pretrain.loop import (
    AudioSource,
    PretrainOptim,
    PretrainSummary,
    PretrainTrain,
    pretrain,
)

log = logging.getLogger("speechbench")

SYNTH_TASKS = ("ks", "ic", "sid", "asv", "asr")  # train splits of these synthetic tasks; ER and test audio left out
SCHEDULES = ("linear", "cosine", "constant")


@dataclass(frozen=True)
class PretrainData:
    source: str = "synth"  # "synth" (the bundled corpus), a directory of .wav/.flac, or a JSONL manifest
    profile: str = "small"  # synthetic corpus profile
    synth_seed: int = 0
    synth_tasks: tuple[str, ...] = SYNTH_TASKS  # synthetic tasks whose train split is used
    audio_root: str | None = None  # root of a manifest's relative paths (default: the manifest's directory)
    min_s: float = 0.5  # utterances shorter than this are skipped


@dataclass(frozen=True)
class PretrainConfig:
    family: str
    description: str = ""
    data: PretrainData = field(default_factory=PretrainData)
    optim: PretrainOptim = field(default_factory=PretrainOptim)
    train: PretrainTrain = field(default_factory=PretrainTrain)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    model: Any = None  # the family's model-options dataclass
    objective: Any = None  # the family's objective-options dataclass


def default_recipe(family: str, iteration: int | None) -> str:
    return "pretrain/hubert_iter2" if family == "hubert" and iteration == 2 else f"pretrain/{family}"


def resolve_pretrain_config(family: str, recipe: str | None = None, overrides: tuple[str, ...] = (),
                            ) -> tuple[PretrainConfig, str]:
    """Parse the recipe (default ``pretrain/<family>``) with overrides; returns the config and the recipe name."""
    name = recipe or f"pretrain/{family}"
    path = find_recipe(name)
    raw = apply_overrides(load_raw_recipe(path), list(overrides))
    where = str(path)
    raw_family = raw.setdefault("family", family)
    if raw_family != family:
        raise ConfigError(f"{where}: a {raw_family} recipe, but --model {family}")
    entry = get_objective(family)
    model = from_dict(entry.model_options, raw.pop("model", None), f"{where}: model")
    objective = from_dict(entry.objective_options, raw.pop("objective", None), f"{where}: objective")
    cfg = from_dict(PretrainConfig, raw, where)
    if cfg.optim.schedule not in SCHEDULES:
        raise ConfigError(f"{where}: optim.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.optim.schedule!r}")
    if cfg.train.max_steps < 0 or cfg.train.batch_size < 1 or cfg.train.crop_s <= 0 or cfg.train.save_every < 1 \
            or cfg.train.log_every < 1:
        raise ConfigError(f"{where}: train needs max_steps >= 0, batch_size >= 1, crop_s > 0, save_every >= 1, "
                          f"log_every >= 1")
    check_runtime(cfg.runtime, where)
    return dataclasses.replace(cfg, model=model, objective=objective), name


def config_dict(cfg: PretrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _utterances(data: PretrainData) -> tuple[list[Utterance], Path | None, str]:
    """The training utterances, their audio root and a description of the source."""
    if data.source == "synth":
        from speechbench.downstreams.synth.corpus import ensure_corpus

        root = ensure_corpus(data.profile, data.synth_seed)
        utts = []
        for task in data.synth_tasks:
            manifest = root / task / "train.jsonl"
            if not manifest.is_file():
                raise DataError(f"{manifest}: synthetic task {task!r} has no train split (use some of "
                                f"{', '.join(SYNTH_TASKS)})")
            utts += read_manifest(manifest)
        return utts, root, f"synth/{data.profile} seed {data.synth_seed} train splits of {','.join(data.synth_tasks)}"
    from speechbench.benchmark.extract import load_inputs

    utts, root = load_inputs(data.source, data.audio_root)
    return utts, root, str(data.source)


def audio_source(data: PretrainData) -> tuple[AudioSource, str]:
    """Resolve the recipe's data section into the loop's :class:`AudioSource` (lengths from the manifests)."""
    utts, root, description = _utterances(data)
    kept = [u for u in utts if u.duration_s >= data.min_s]
    if not kept:
        raise DataError(f"{data.source}: no utterance of at least {data.min_s} s (data.min_s)")
    paths = [str(resolve_audio_path(u, root)) for u in kept]
    num_samples = [int(round(u.duration_s * SAMPLE_RATE)) for u in kept]
    source = AudioSource(paths, num_samples, lambda p: load_audio(p, SAMPLE_RATE))
    return source, f"{description}: {len(kept)} utterances, {source.hours:.2f} h"


def run_pretrain(family: str, out_dir: str, recipe: str | None = None, data: str | None = None,
                 overrides: tuple[str, ...] = (), iteration: int | None = None, teacher: str | None = None,
                 progress: bool = True, command: str = "", device: str | None = None,
                 precision: str | None = None) -> PretrainSummary:
    """``bench pretrain``: resolve the recipe, build the objective, train (resuming from ``out_dir``) on the
    recipe's ``runtime`` (``device``/``precision`` override it), in every process of a torchrun job."""
    extra = list(overrides)
    if device:
        extra.insert(0, f"runtime.device={device}")
    if precision:
        extra.insert(0, f"runtime.precision={precision}")
    if data:
        extra.insert(0, f"data.source={data}")
    if iteration is not None:
        if family != "hubert":
            raise ConfigError(f"--iteration applies to hubert only, not {family}")
        extra.insert(0, f"objective.iteration={iteration}")
    if teacher:
        if family != "hubert":
            raise ConfigError(f"--from (the previous iteration's model) applies to hubert only, not {family}")
        extra.insert(0, f"objective.teacher={Path(teacher).expanduser().resolve()}")
    cfg, name = resolve_pretrain_config(family, recipe or default_recipe(family, iteration), tuple(extra))
    runtime = make_runtime(cfg.runtime.device, cfg.runtime.precision)
    source, described = audio_source(cfg.data)
    log.info("pretraining %s (recipe %s) on %s", family, name, described)
    entry = get_objective(family)
    try:
        objective = entry.build(cfg.model, cfg.objective, cfg.train.seed)
    except ValueError as e:  # option combinations the family rejects (one-line messages naming the option)
        raise ConfigError(f"{find_recipe(name)}: {e}") from None
    trainable = sum(p.numel() for p in objective.parameters() if p.requires_grad)
    log.info("%s objective: %.2fM trainable parameters; %d steps x %d crops x %.1f s; device %s, precision %s%s",
             family, trainable / 1e6, cfg.train.max_steps, cfg.train.batch_size, cfg.train.crop_s, runtime.device,
             runtime.precision, f", {runtime.dist.world_size} processes" if runtime.dist.enabled else "")
    resolved = config_dict(cfg)
    recipe_sha = hashlib.sha256(json.dumps(identity_dict(resolved), sort_keys=True).encode()).hexdigest()
    meta = {"pretraining": {"recipe": name, "config_sha256": recipe_sha, "overrides": list(overrides),
                            "data": described, "seed": cfg.train.seed, "git_sha": git_sha(),
                            "command": command}}
    summary = pretrain(objective, source, cfg.optim, cfg.train, out_dir, resolved, meta, progress=progress,
                       runtime=runtime)
    log.info("pretrained %s: %d steps (from %d), final loss %.4f, %.1f audio s per wall s; upstream: %s", family,
             summary.steps, summary.resumed_from, summary.final_loss, summary.audio_s_per_s, summary.upstream_dir)
    return summary
