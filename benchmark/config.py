"""Recipes: YAML files parsed into frozen dataclasses, with ``key.sub=value`` overrides.

A recipe has fixed sections (``data``, ``featurizer``, ``optim``, ``train``, ``protocol``, ``runtime``) and one
task-specific section, ``task_options``, parsed by the task's own options dataclass. Unknown keys are errors that list
the valid ones. Values are plain YAML scalars, lists and (for ``dict`` fields such as ``task_options.columns``)
mappings of them (``yaml.safe_load``): no object construction, no ``eval``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from speechbench.common import (
    HF_PREFIX,
    PATH_KEYWORDS,
    PATH_OPTION,
    SpeechbenchError,
    hf_location,
    is_local_hf_location,
    path_option,
)


class ConfigError(SpeechbenchError, ValueError):
    """A recipe or override that does not fit the schema (one-line message naming the source)."""


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "synth"  # "synth" = the bundled synthetic corpus; "real" = a corpus found at `root`
    profile: str = "small"  # synthetic corpus profile: tiny | small
    synth_seed: int = 0  # seed of the synthetic corpus generator
    root: str | None = path_option()  # real corpus location (the task says which layout it expects)
    max_per_split: int | None = None  # quick runs: a seeded random subset of at most this many utterances per split


@dataclass(frozen=True)
class FeaturizerConfig:
    layer_norm: bool = False  # per-layer layer norm before the weighted sum (SUPERB default: off)
    layer: int | None = None  # use this single hidden state instead of the learned weighted sum


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"  # adam | adamw
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000  # optimizer updates
    batch_size: int = 32  # utterances per micro-batch (pooled features) or upper bound (frames)
    grad_accum: int = 1  # micro-batches per optimizer update
    eval_every: int = 100  # steps between dev evaluations (and checkpoints)
    log_every: int = 50
    seed: int = 0
    max_batch_s: float = 160.0  # cap on padded audio seconds per micro-batch when batching by length
    eval_batch_size: int = 64


@dataclass(frozen=True)
class ProtocolConfig:
    """What a recipe claims about the published protocol it reproduces (recorded in every result).

    ``reproduces``: ``"superb"`` for a recipe that reproduces SUPERB's setting (s3prl's configs), empty otherwise.
    ``deviations``: every known difference from that protocol that may change the number, each with its expected
    effect; a result with any deviation (declared here or found at run time) is not counted in the SUPERB score.
    ``known_differences``: implementation differences not expected to change the number, kept for audit.
    """

    reproduces: str = ""
    deviations: tuple[str, ...] = ()
    known_differences: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and in what precision a run computes (``--device``, ``--precision``).

    ``device`` is where the run computes, not what it computes: it is left out of the run's identity
    (:func:`config_sha256`), so a run started on one device resumes on another. ``precision`` changes the numbers:
    it is part of the identity (when not fp32), of the feature cache key, and of the protocol fingerprint.
    """

    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (torch.autocast): upstream forward and head


@dataclass(frozen=True)
class RunConfig:
    task: str
    recipe: str = "custom"
    description: str = ""
    cache: str = "auto"  # auto | pooled | frames | off (see benchmark/cache.py)
    cache_budget_gb: float = 20.0  # auto uses a frames cache only when its estimated size fits this budget
    data: DataConfig = field(default_factory=DataConfig)
    featurizer: FeaturizerConfig = field(default_factory=FeaturizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    task_options: Any = None  # the task's own frozen options dataclass


CACHE_MODES = ("auto", "pooled", "frames", "off")
_NULLS = ("null", "none", "~", "")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently coerce) a YAML scalar to the annotated field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NULLS)):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is dict:  # a mapping of names, e.g. task_options.columns (key.sub=value overrides fill it)
        key_tp, item_tp = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping (set entries as {where.split(': ')[-1]}.<key>=value), "
                              f"got {value!r}")
        return {_coerce(k, key_tp, f"{where} key"): _coerce(v, item_tp, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        hint = " (YAML reads unquoted on/off/yes/no as booleans: quote the value)" if isinstance(value, bool) else ""
        raise ConfigError(f"{where}: expected a string, got {value!r}{hint}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def from_dict(cls: type, data: dict | None, where: str) -> Any:
    """Build a frozen dataclass from a mapping, rejecting unknown keys and wrong types."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing required key {f.name!r}")
            continue
        value, tp = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = from_dict(tp, value, f"{where}.{f.name}")
        else:
            kwargs[f.name] = _coerce(value, tp, f"{where}.{f.name}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], str]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], "1e-3").

    The value stays text; the schema's field type converts it, so ``cache=off`` is the string "off" and
    ``optim.lr=1e-3`` the number 0.001 (YAML 1.1 would read them as a boolean and a string).
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    return parts, value.strip()


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of the raw recipe mapping with every ``key.sub=value`` applied."""
    raw = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def recipes_root() -> Path:
    return Path(str(resources.files("speechbench.recipes")))


def list_recipes() -> list[str]:
    root = recipes_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def find_recipe(name_or_path: str) -> Path:
    """A recipe name like ``synth/ks`` (shipped with the package) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = recipes_root() / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"recipe {name_or_path!r} not found; shipped recipes: {', '.join(list_recipes())}")


def load_raw_recipe(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    return raw


def build_run_config(raw: dict, options_cls: type, where: str) -> RunConfig:
    """Parse a raw recipe mapping; ``task_options`` goes through the task's own dataclass."""
    raw = dict(raw)
    task_options = from_dict(options_cls, raw.pop("task_options", None), f"{where}: task_options")
    cfg = from_dict(RunConfig, raw, where)
    if cfg.cache not in CACHE_MODES:
        raise ConfigError(f"{where}: cache must be one of {', '.join(CACHE_MODES)}, got {cfg.cache!r}")
    if cfg.optim.name not in ("adam", "adamw"):
        raise ConfigError(f"{where}: optim.name must be adam or adamw, got {cfg.optim.name!r}")
    check_runtime(cfg.runtime, where)
    return resolve_paths(dataclasses.replace(cfg, task_options=task_options))


def _absolute(value: str, base: Path | None = None) -> str:
    path = Path(value).expanduser()
    return str(((base / path) if base is not None and not path.is_absolute() else path).resolve())


def _resolve_section(section: Any, data_root: Path | None) -> Any:
    """Resolve the path options (fields made with :func:`speechbench.common.path_option`) of one config section."""
    if not dataclasses.is_dataclass(section):
        return section
    changes = {}
    for f in dataclasses.fields(section):
        relative_to, value = f.metadata.get(PATH_OPTION), getattr(section, f.name)
        if relative_to is None or value is None:
            continue
        keywords = f.metadata.get(PATH_KEYWORDS, ())
        values = value if isinstance(value, tuple) else (value,)
        resolved = tuple(_resolve_one(v, relative_to, data_root, keywords) for v in values)
        changes[f.name] = resolved if isinstance(value, tuple) else resolved[0]
    return dataclasses.replace(section, **changes) if changes else section


def _resolve_one(value: str, relative_to: str, data_root: Path | None, keywords: tuple[str, ...]) -> str:
    if value in keywords:
        return value
    where = hf_location(value)
    if where is not None:  # hf:<folder> -> hf:<absolute folder>; a hub id (hf:superb:ks) is not a path
        return HF_PREFIX + _absolute(where) if is_local_hf_location(where) else value
    if relative_to == "data_root" and not Path(value).expanduser().is_absolute():
        # the synthetic corpus has no data root: nothing to be relative to, and nothing reads the path
        return value if data_root is None else _absolute(value, data_root)
    return _absolute(value)


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Every path option resolved to an absolute path, once: ``data.root`` (relative to the working directory),
    then the task's path options (relative to the working directory or to ``data.root``, as each field says).
    A data root ``hf:<where>`` (a Hugging Face dataset) keeps its prefix: a dataset folder becomes absolute and is what
    options are relative to; a hub id stays as written and its relative options are taken from the working directory.

    Done where the config is built, so the resolved paths are what ``config.yaml``, the run id and ``result.json``
    record, and a run behaves the same whatever the working directory of the code that reads them.
    """
    data = _resolve_section(cfg.data, None)
    root = Path(data.root) if data.root else None
    where = hf_location(data.root)
    if where is not None:  # options relative to a dataset folder; a hub dataset has none (working directory)
        root = Path(where) if is_local_hf_location(where) else Path.cwd()
    return dataclasses.replace(cfg, data=data, task_options=_resolve_section(cfg.task_options, root))


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def check_runtime(runtime: Any, where: str, prefix: str = "runtime.") -> None:
    """The ``runtime`` section's values are known ones (whether this machine has the device is checked when the
    run starts); ``prefix`` names the fields in messages."""
    from speechbench.runtime import PRECISIONS, DeviceError, parse_device

    if runtime.precision not in PRECISIONS:
        raise ConfigError(f"{where}: {prefix}precision must be one of {', '.join(PRECISIONS)}, got "
                          f"{runtime.precision!r}")
    try:
        parse_device(runtime.device)
    except DeviceError as e:
        raise ConfigError(f"{where}: {prefix}{e}") from None


def identity_dict(config: dict) -> dict:
    """What identifies a run (or a pretraining run) in a resolved config mapping: everything but where it computes
    (``runtime.device``); the ``runtime`` section only when its precision is not fp32, so that configs written
    before the section existed keep their sha256 (and their run directories)."""
    config = dict(config)
    runtime = dict(config.pop("runtime", None) or {})
    runtime.pop("device", None)
    if runtime and runtime != {"precision": "fp32"}:
        config["runtime"] = runtime
    return config


def config_sha256(cfg: RunConfig) -> str:
    """sha256 of the run's identity (:func:`identity_dict`): names its run directory, recorded in result.json."""
    text = json.dumps(identity_dict(config_to_dict(cfg)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
