"""One evaluation: (upstream, task, recipe) -> trained heads -> result.json files.

Learning-rate and seed lists share one set of features: the frozen upstream is run once per split.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from speechbench.benchmark.cache import FeatureStore, estimate_frames_bytes, pooled_source
from speechbench.benchmark.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    build_run_config,
    config_sha256,
    config_to_dict,
    find_recipe,
    load_raw_recipe,
)
from speechbench.benchmark.cost import upstream_cost
from speechbench.benchmark.features import OnTheFlyFeatures, PooledFeatures
from speechbench.benchmark.protocol import protocol_record
from speechbench.benchmark.results import SCHEMA_VERSION, git_sha, package_versions, read_result, utc_now, write_result
from speechbench.benchmark.train import DownstreamModel, batches_by_length, evaluate, train
from speechbench.common import atomic_write_text, data_root_env
from speechbench.downstreams.data import write_manifest
from speechbench.downstreams.featurizer import WeightedLayerSum
from speechbench.downstreams.tasks import (
    ITEMS_FILENAME,
    PreparedData,
    Task,
    get_task,
    write_items,
    write_predictions_tsv,
)
from speechbench.runtime import Phases, Runtime, make_runtime
from speechbench.upstreams.base import describe_upstream
from speechbench.upstreams.checkpoints import CheckpointError
from speechbench.upstreams.registry import build_upstream, local_upstream_path, upstream_slug

log = logging.getLogger("speechbench")


@dataclass(frozen=True)
class RunRequest:
    upstream: str
    task: str
    recipe: str | None = None  # default: synth/<task> without a data root, superb/<task> with one
    data_root: str | None = None
    overrides: tuple[str, ...] = ()
    lrs: tuple[float, ...] = ()  # empty: the recipe's optim.lr
    seeds: tuple[int, ...] = ()  # empty: the recipe's train.seed
    layer: int | None = None
    cache: str | None = None
    fold: int | None = None
    out_dir: str = "results"
    rerun: bool = False
    ckpt: str | None = None  # local checkpoint replacing a family/card upstream's published one
    trust_checkpoint: bool = False  # allow checkpoints that need full unpickling
    checkpoint_sha256: str | None = None  # refuse an upstream whose checkpoint hash differs (bench rerun)
    device: str | None = None  # --device: auto | cpu | cuda | cuda:N (None: the recipe's runtime.device, auto)
    precision: str | None = None  # --precision: fp32 | bf16 | fp16 (None: the recipe's runtime.precision, fp32)

    @property
    def upstream_label(self) -> str:
        """The upstream's name in results and its results folder: ``--upstream`` (for a local path a readable slug,
        see :func:`upstream_slug`), plus ``@<checkpoint file>`` when ``--ckpt`` is given."""
        return f"{self.upstream}@{Path(self.ckpt).name}" if self.ckpt else upstream_slug(self.upstream)

    @property
    def upstream_path(self) -> str | None:
        """The resolved local checkpoint path (``--upstream PATH`` or ``--ckpt PATH``), recorded in the result."""
        if self.ckpt:
            return str(Path(self.ckpt).expanduser().resolve())
        path = local_upstream_path(self.upstream)
        return str(path) if path else None


def default_recipe(task: str, data_root: str | None) -> str:
    return f"superb/{task}" if data_root else f"synth/{task}"


def data_root_for(req: RunRequest, task: Task) -> str | None:
    """``--data-root``, else ``$SPEECHBENCH_DATA_ROOT/<the task's real corpus folder>``, else None (synthetic)."""
    if req.data_root:
        return req.data_root
    env = data_root_env()
    return str(env / task.real_corpus) if env else None


def resolve_config(req: RunRequest, task: Task, shipped: bool = False) -> RunConfig:
    """Recipe + command-line flags + ``key.sub=value`` overrides -> a validated RunConfig.

    ``shipped``: the recipe as shipped, with only the data location applied (what overrides are compared with).
    """
    data_root = data_root_for(req, task)
    recipe = req.recipe or default_recipe(task.name, data_root)
    path = find_recipe(recipe)
    raw = load_raw_recipe(path)
    if raw.get("task", task.name) != task.name:
        raise ConfigError(f"{path}: recipe is for task {raw.get('task')!r}, not {task.name!r}")
    raw.setdefault("task", task.name)
    raw["recipe"] = recipe
    flags = []
    if data_root:
        flags += ["data.corpus=real", f"data.root={data_root}"]
    if shipped:
        return build_run_config(apply_overrides(raw, flags), task.options_cls, str(path))
    if req.layer is not None:
        flags.append(f"featurizer.layer={req.layer}")
    if req.cache:
        flags.append(f"cache={req.cache}")
    if req.device:
        flags.append(f"runtime.device={req.device}")
    if req.precision:
        flags.append(f"runtime.precision={req.precision}")
    raw = apply_overrides(raw, flags + list(req.overrides))
    return build_run_config(raw, task.options_cls, str(path))


def _tag(value: float) -> str:
    return f"{value:g}".replace("+", "")


def upstream_results_dir(out_dir: Path, upstream_label: str) -> Path:
    """``OUT/<upstream>``: the folder of an upstream's run directories (labels are slugs already)."""
    return Path(out_dir) / upstream_label.replace("/", "_").replace(":", "_")


def run_dir_for(out_dir: Path, upstream: str, cfg: RunConfig, fold: int | None, rerun: bool) -> Path:
    sha = config_sha256(cfg)[:8]
    fold_tag = f"-fold{fold}" if fold is not None else ""
    name = f"{cfg.recipe.replace('/', '-')}{fold_tag}-lr{_tag(cfg.optim.lr)}-seed{cfg.train.seed}-{sha}"
    base = upstream_results_dir(out_dir, upstream) / cfg.task / name
    if not rerun:
        return base
    k = 2
    while base.with_name(f"{name}-r{k}").exists():
        k += 1
    return base.with_name(f"{name}-r{k}")


def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler


def _upstream_record(upstream, name: str) -> dict:
    return {**describe_upstream(upstream), "name": name, "versions": package_versions()}


def choose_cache(cfg: RunConfig, task: Task, prepared: PreparedData, upstream) -> tuple[str, float | None]:
    """Resolve ``cache`` to pooled | frames | off, and the training crop in seconds (None: no crop).

    A crop that no training utterance exceeds changes nothing, so it does not count against pooled exactness.
    """
    crop_s = task.train_crop_s(cfg.task_options) if task.train_crop_s else None
    if crop_s and not any(u.duration_s > crop_s for u in prepared.splits["train"]):
        crop_s = None
    exact_pooled = task.granularity == "pooled" and not crop_s and not cfg.featurizer.layer_norm
    if cfg.cache == "pooled" and not exact_pooled:
        why = ("it trains on random crops" if crop_s else "featurizer.layer_norm is not linear"
               if cfg.featurizer.layer_norm else "its head needs frames")
        raise ConfigError(f"cache=pooled is not exact for task {task.name}: {why}; use cache=auto, frames or off")
    if cfg.cache != "auto":
        return cfg.cache, crop_s
    if exact_pooled:
        return "pooled", crop_s
    size_gb = sum(estimate_frames_bytes(u, upstream) for u in prepared.splits.values()) / 1e9
    mode = "frames" if size_gb <= cfg.cache_budget_gb else "off"
    log.info("frames cache estimate: %.2f GB (budget %.1f GB) -> cache %s", size_gb, cfg.cache_budget_gb, mode)
    return mode, crop_s


class FeatureSet:
    """The features of every split, shared by every learning rate and seed; from the feature cache, where only the
    utterances no earlier run (of any split, fold or task) has extracted go through the upstream."""

    def __init__(self, upstream, upstream_name: str, task: Task, prepared: PreparedData, cfg: RunConfig,
                 runtime: Runtime | None = None):
        runtime = runtime or Runtime()
        self.mode, crop_s = choose_cache(cfg, task, prepared, upstream)
        self.crop_s = crop_s  # training crop (None: whole utterances); length buckets use the cropped durations
        self.pooled = self.mode == "pooled"
        self.description = {"pooled": "pooled cache (per-layer time-means)", "frames": "frames cache (float16)",
                            "off": "upstream on the fly"}[self.mode] + (f", {crop_s:g} s training crops"
                                                                         if crop_s else "")
        log.info("features: %s", self.description)
        frame_rate = upstream.sample_rate / upstream.downsample_rate
        self.sources = {}
        self.cache_record: dict | None = None  # what the cache did, for result.json (None: cache off)
        store = None if self.mode == "off" else FeatureStore.open(upstream, upstream_name, runtime.precision)
        if store is not None:
            self.cache_record = {"key": store.directory.name, "precision": store.identity["precision"],
                                 "splits": {}, **({"pooled": pooled_source(runtime.precision)} if self.pooled else {})}
        for split, utts in prepared.splits.items():
            crop = crop_s if split == "train" else None
            if store is None:
                self.sources[split] = OnTheFlyFeatures(upstream, utts, prepared.audio_root, crop, cfg.train.seed,
                                                       runtime)
                continue
            t0 = time.perf_counter()
            cached = store.ensure(upstream, utts, prepared.audio_root, self.mode, desc=split, runtime=runtime)
            self.cache_record["splits"][split] = cached.stats.record(self.mode)
            if self.pooled:
                self.sources[split] = PooledFeatures(cached.pooled().to(runtime.device))
            else:
                crop_frames = int(crop * frame_rate) if crop else None
                self.sources[split] = cached.frames(frame_rate, runtime.device).with_crop(crop_frames,
                                                                                          cfg.train.seed)
            log.info("%s features of %d %s utterances ready in %.1f s", self.mode, len(utts), split,
                     time.perf_counter() - t0)


def subsample(prepared: PreparedData, max_per_split: int | None) -> PreparedData:
    """Keep a seeded random subset of at most ``max_per_split`` utterances per split (manifest order kept)."""
    if not max_per_split:
        return prepared
    splits = {}
    for split, utts in prepared.splits.items():
        if len(utts) <= max_per_split:
            splits[split] = utts
            continue
        keep = sorted(np.random.default_rng(0).choice(len(utts), max_per_split, replace=False).tolist())
        splits[split] = [utts[i] for i in keep]
    return dataclasses.replace(prepared, splits=splits)


def audio_roots(prepared: PreparedData) -> dict[str, str]:
    """Each split's audio root as an absolute path: what the relative paths of the run's ``manifests/<split>.jsonl``
    are relative to (each row of those manifests records it too, as ``audio_root``)."""
    return {split: str(Path(prepared.audio_root).absolute()) for split in prepared.splits}


def train_and_score(req: RunRequest, task: Task, cfg: RunConfig, upstream, prepared: PreparedData,
                    features: FeatureSet, run_dir: Path, fold: int | None, protocol: dict,
                    cost: dict | None = None, runtime: Runtime | None = None, phases: Phases | None = None) -> dict:
    """Train one head, pick the best dev checkpoint, score it on test, write result.json (with ``protocol``).

    Under torchrun every rank trains and evaluates its part; rank 0 alone writes. ``phases`` holds the wall time
    of the phases shared by the fold's runs (data, cache); this run's train and test phases are added to a copy."""
    runtime = runtime or Runtime()
    phases = phases.copy() if phases is not None else Phases(runtime.device)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    featurizer = WeightedLayerSum(upstream.num_layers, cfg.featurizer.layer_norm, cfg.featurizer.layer)
    model = DownstreamModel(featurizer, task.build_head(upstream.hidden_size, prepared, cfg.task_options))
    train_utts, dev_utts, test_utts = (prepared.splits[s] for s in ("train", "dev", "test"))
    weights = task.sample_weights or (lambda *_: None)
    with phases("train"):
        state = train(model, task, cfg, features.sources["train"], task.targets(train_utts, prepared),
                      [min(u.duration_s, features.crop_s or u.duration_s) for u in train_utts],
                      features.sources["dev"], task.references(dev_utts, prepared), run_dir / "checkpoints",
                      length_buckets=batches_by_length(task),
                      train_weights=weights(train_utts, prepared, cfg.task_options),
                      dev_weights=weights(dev_utts, prepared, cfg.task_options), runtime=runtime)
    with phases("test"):
        model.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt", map_location=runtime.device,
                                         weights_only=True))
        test_refs = task.references(test_utts, prepared)
        scores, predictions = evaluate(model, task, features.sources["test"], test_refs, cfg.train.eval_batch_size,
                                       cfg.train.max_batch_s, runtime)
        items = None
        if runtime.dist.main:
            (task.write_outputs or write_predictions_tsv)(run_dir, test_utts, predictions, test_refs)
            if task.item_scores is not None:
                items = write_items(run_dir / ITEMS_FILENAME, task.item_scores(predictions, test_refs, test_utts))
    result = {
        "schema_version": SCHEMA_VERSION,
        "upstream": {**_upstream_record(upstream, req.upstream_label), "path": req.upstream_path},
        "task": task.name,
        "recipe": {"name": cfg.recipe, "config_sha256": config_sha256(cfg)},
        "protocol": protocol,
        "data": {"corpus": prepared.corpus, **prepared.info, "audio_roots": audio_roots(prepared)},
        "split": "test", "fold": fold,
        "metric": task.metric, "value": scores[task.metric], "unit": task.unit,
        "higher_is_better": task.higher_is_better,
        "extra_metrics": {**{k: v for k, v in scores.items() if k != task.metric},
                          f"dev_{task.metric}": state.best_dev},
        "learning_rate": cfg.optim.lr, "seed": cfg.train.seed, "selected": True,
        "features": features.description, "feature_cache": features.cache_record,
        "layer_weights": model.featurizer.layer_weights(), "layer": cfg.featurizer.layer,
        "items": items, "cost": cost, "runtime": runtime.record(), "resources": phases.record(runtime),
        "best_step": state.best_step, "steps": state.step,
        "wall_time_s": round(time.perf_counter() - t0, 2), "git_sha": git_sha(), "timestamp": utc_now(),
        "run_id": run_dir.name,
    }
    if runtime.dist.main:
        write_result(run_dir / "result.json", result)
    return result


def measured_cost(upstream, runtime: Runtime | None = None) -> dict | None:
    """The upstream's measured cost (``benchmark/cost.py``, cached per upstream, device and precision); None, with
    a warning, when it cannot be measured (the run itself does not depend on it)."""
    runtime = runtime or Runtime()
    try:
        return upstream_cost(upstream, device=runtime.device, precision=runtime.precision)
    except Exception as e:  # a cost column is not worth failing an evaluation for
        log.warning("could not measure the cost of %s (%s: %s); result.json gets cost null", upstream.name,
                    type(e).__name__, e)
        return None


def mark_selected(results: list[tuple[Path, dict]], task: Task) -> None:
    """Within each (fold, seed) group of a learning-rate sweep, mark the best-on-dev run as selected."""
    groups: dict[tuple, list[tuple[Path, dict]]] = {}
    for path, result in results:
        groups.setdefault((result["fold"], result["seed"]), []).append((path, result))
    for group in groups.values():
        dev_key = f"dev_{task.metric}"
        sign = 1 if task.higher_is_better else -1
        best_path, _ = max(group, key=lambda pr: sign * pr[1]["extra_metrics"][dev_key])
        for path, result in group:
            selected = path == best_path
            if result.get("selected") != selected:
                result["selected"] = selected
                write_result(path / "result.json", result)


def run(req: RunRequest, config: RunConfig | None = None) -> list[dict]:
    """Run every (fold, seed, learning rate) of the request; return their result rows.

    ``config``: an already resolved config (``bench rerun`` passes a run's ``config.yaml``) used instead of the
    request's recipe, data root, layer, cache and overrides.

    Runs on the config's ``runtime.device`` and ``runtime.precision``; under torchrun every rank calls it with the
    same request, and rank 0 alone writes (run folders, logs, checkpoints, results)."""
    task = get_task(req.task)
    base_cfg = config or resolve_config(req, task)
    shipped_cfg = resolve_config(req, task, shipped=True)
    runtime = make_runtime(base_cfg.runtime.device, base_cfg.runtime.precision)
    main = runtime.dist.main
    source = "the synthetic corpus (a smoke benchmark, not SUPERB numbers)" if base_cfg.data.corpus == "synth" \
        else f"the real corpus at {base_cfg.data.root}"
    log.info("task %s, upstream %s, recipe %s, data: %s", task.name, req.upstream, base_cfg.recipe, source)
    log.info("device %s (%s), precision %s%s", runtime.device, runtime.record()["device_name"], runtime.precision,
             f", {runtime.dist.world_size} processes" if runtime.dist.enabled else "")
    upstream = build_upstream(req.upstream, ckpt=req.ckpt, trust_checkpoint=req.trust_checkpoint)
    if isinstance(upstream, torch.nn.Module):
        upstream.to(runtime.device)
    sha = describe_upstream(upstream)["checkpoint_sha256"]
    if req.checkpoint_sha256 and sha != req.checkpoint_sha256:
        raise CheckpointError(f"upstream {req.upstream_label}: checkpoint sha256 is now {str(sha)[:16]}..., the "
                              f"recorded run used {req.checkpoint_sha256[:16]}...; the weights changed, so this would "
                              f"not be the same run")
    cost = measured_cost(upstream, runtime) if main else None  # only rank 0 writes results
    folds: list[int | None] = [req.fold] if req.fold is not None else (list(task.folds) or [None])
    lrs = list(req.lrs) or [base_cfg.optim.lr]
    seeds = list(req.seeds) or [base_cfg.train.seed]
    out_dir = Path(req.out_dir)
    rows: list[tuple[Path, dict]] = []
    for fold in folds:
        fold_cfg = base_cfg if fold is None else dataclasses.replace(
            base_cfg, task_options=dataclasses.replace(base_cfg.task_options, fold=fold))
        phases = Phases(runtime.device)
        with phases("data"):
            prepared = subsample(task.prepare(fold_cfg.data, fold_cfg.task_options), fold_cfg.data.max_per_split)
        log.info("data: %s", ", ".join(f"{s} {len(u)}" for s, u in prepared.splits.items()))
        features = None
        for seed in seeds:
            for lr in lrs:
                cfg = dataclasses.replace(fold_cfg, optim=dataclasses.replace(fold_cfg.optim, lr=lr),
                                          train=dataclasses.replace(fold_cfg.train, seed=seed))
                run_dir = run_dir_for(out_dir, req.upstream_label, cfg, fold, req.rerun)
                if (run_dir / "result.json").exists():
                    log.info("already done: %s (pass --rerun for a new run)", run_dir / "result.json")
                    rows.append((run_dir, read_result(run_dir / "result.json")))
                    continue
                handler = None
                if main:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    handler = _attach_log_file(run_dir)
                try:
                    if main:
                        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg),
                                                                                  sort_keys=False))
                        for split, utts in prepared.splits.items():
                            write_manifest(run_dir / "manifests" / f"{split}.jsonl", utts, prepared.audio_root)
                    log.info("run %s: lr %g, seed %d%s", run_dir, lr, seed, f", fold {fold}" if fold else "")
                    if features is None:
                        with phases("cache"):
                            features = FeatureSet(upstream, req.upstream_label, task, prepared, cfg, runtime)
                    protocol = protocol_record(cfg, shipped_cfg, task, prepared, lrs)
                    if cfg.protocol.reproduces:
                        for deviation in protocol["deviations"]:
                            log.info("protocol deviation: %s", deviation)
                    else:
                        log.info("protocol: %s does not reproduce a published protocol (%d deviations, listed in "
                                 "result.json)", cfg.recipe, len(protocol["deviations"]))
                    result = train_and_score(req, task, cfg, upstream, prepared, features, run_dir, fold, protocol,
                                             cost, runtime, phases)
                    log.info("test %s = %.2f%s (best dev step %d) -> %s", task.metric, result["value"], task.unit,
                             result["best_step"], run_dir / "result.json")
                    rows.append((run_dir, result))
                finally:
                    if handler is not None:
                        log.removeHandler(handler)
                        handler.close()
    if len(lrs) > 1 and main:
        mark_selected(rows, task)
    return [r for _, r in rows]
