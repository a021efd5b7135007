"""Checkpoint files: safe loading, format detection, hashing, and our own format.

Loading never executes code from a checkpoint:

- safetensors files are read with ``safetensors`` (pure data);
- pickles (``.pt``/``.ckpt``/``.bin``) go through ``torch.load(weights_only=True)``, whose unpickler only builds
  tensors, containers and an explicit allow-list of classes (``SAFE_GLOBALS``). Real fairseq and s3prl files pickle
  a few non-tensor objects; what they need is allow-listed either as the harmless real class (``argparse.Namespace``,
  ``collections.defaultdict``, numpy scalars and dtypes, ``typing.Any``) or as an inert *stand-in* registered under
  the original class path (fairseq's ``Dictionary`` in HuBERT's ``task_state``, omegaconf containers and nodes of
  configs saved before fairseq switched to plain dicts, fairseq's ``Choices`` string enums). A stand-in has no
  methods: the unpickler only stores the pickled attributes on it, and :func:`to_plain` turns it into plain data;
- anything else (a checkpoint whose unpickling needs any other global, e.g. ``os.system``) is refused with a
  one-line :class:`UnsafeCheckpointError` naming the globals, unless the caller passes ``trust=True``
  (``--trust-checkpoint``), which falls back to full unpickling.

Formats (:func:`detect_checkpoint`), by content rather than by file name:

================  =============================================================================================
``speechbench``   a directory with ``speechbench.json`` (family), ``config.json`` and ``model.safetensors``; for
                  wav2vec2/HuBERT it is also a loadable HF directory (plus ``preprocessor_config.json``)
``hf-dir``        a directory with an HF ``config.json`` whose ``model_type`` a registered family serves
``fairseq``       a pickle ``{"cfg" or "args": ..., "model": state_dict}`` of a wav2vec 2.0/HuBERT/data2vec-audio
                  (or their fine-tuned ``*_ctc``) model, converted in-process by :mod:`upstreams.fairseq_convert`
``unilm``         WavLM as Microsoft's unilm code released it: ``{"cfg": flat dict, "model": state_dict}``, converted
                  by the same module
``s3prl``         a pickle of s3prl's layouts: converted wav2vec2/HuBERT/data2vec ``{"task_cfg", "model_cfg",
                  "model_weight"[, "dictionaries_symbols"]}``; DistilHuBERT ``{"Config": {"distiller": ...},
                  "Distiller": state_dict, ...}``; APC ``{"config": {"model": {"paras"}, "data": {"audio"}},
                  "model": state_dict}``; CPC (libri-light) ``{"config": args dict, "weights": ...}``
================  =============================================================================================
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import pickle
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechbench.common import SpeechbenchError, atomic_write_bytes, atomic_write_text, sha256_file
from speechbench.upstreams.families import family_for_model_type, family_names, get_family, hf_model_types

log = logging.getLogger("speechbench")

SPEECHBENCH_JSON = "speechbench.json"
FORMAT_VERSION = 1
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(SpeechbenchError, ValueError):
    """A checkpoint that cannot be used as given (one-line message naming the file and what to do)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle whose loading needs globals outside the allow-list."""


# ---------------------------------------------------------------------------------------------------------------
# Safe unpickling
# ---------------------------------------------------------------------------------------------------------------


class _Inert:
    """Base of the stand-ins: the unpickler may create one and set attributes on it; nothing else happens."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | type(None)):
            state, slots = state
            self.__dict__.update(slots or {})
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state


class FairseqDictionary(_Inert):
    """Stand-in for ``fairseq.data.dictionary.Dictionary`` (HuBERT's label dictionaries in ``task_state``)."""


class OmegaDictConfig(_Inert):
    """Stand-in for ``omegaconf.DictConfig``: pickled state holds ``_content`` (key -> node)."""


class OmegaListConfig(_Inert):
    """Stand-in for ``omegaconf.ListConfig``: pickled state holds ``_content`` (list of nodes)."""


class OmegaNode(_Inert):
    """Stand-in for omegaconf value nodes (``AnyNode``, ``StringNode``, ...): pickled state holds ``_val``."""


class OmegaMetadata(_Inert):
    """Stand-in for ``omegaconf.base.Metadata`` / ``ContainerMetadata`` (typing information only)."""


class FairseqChoice(str):
    """Stand-in for fairseq's ``Choices`` string enums (``ChoiceEnum``): rebuilt as the plain string value."""

    def __new__(cls, value: Any = "") -> FairseqChoice:
        return str.__new__(cls, value)


def _numpy_globals() -> list:
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    items: list = [np.dtype, np.ndarray]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and numpy 2 pickles
        items += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        items += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return items


def _safe_globals() -> list:
    stand_ins = [(FairseqDictionary, "fairseq.data.dictionary.Dictionary"),
                 (FairseqChoice, "fairseq.dataclass.constants.Choices"),
                 (OmegaDictConfig, "omegaconf.dictconfig.DictConfig"),
                 (OmegaListConfig, "omegaconf.listconfig.ListConfig"),
                 (OmegaMetadata, "omegaconf.base.Metadata"),
                 (OmegaMetadata, "omegaconf.base.ContainerMetadata")]
    stand_ins += [(OmegaNode, f"omegaconf.nodes.{n}") for n in
                  ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode", "BytesNode",
                   "PathNode")]
    real = [argparse.Namespace, collections.defaultdict, (typing.Any, "typing.Any"), dict, list, tuple, set, str, int,
            float, bool, object]
    return stand_ins + real + _numpy_globals()


SAFE_GLOBALS = _safe_globals()


def _reason(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1][:160]}" if lines else type(e).__name__


def safe_torch_load(path: str | os.PathLike, trust: bool = False) -> Any:
    """Load a torch/pickle checkpoint on CPU without running code from it (see the module docstring).

    Raises :class:`UnsafeCheckpointError` (one line, naming the offending globals) when the file needs more than
    the allow-list, unless ``trust`` is set; :class:`CheckpointError` when it is not a torch pickle at all.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needed = _unsafe_globals(path)
        if not needed:  # not a question of allowed classes: a corrupt file or not a pickle at all
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({_reason(e)})") from None
        if not trust:
            raise UnsafeCheckpointError(
                f"{path}: refusing to unpickle: loading it would need {', '.join(needed)}, which is not on the safe "
                f"allow-list (a checkpoint can run code this way); pass --trust-checkpoint only if you trust where "
                f"it came from") from None
        log.warning("%s: unpickling with full trust (--trust-checkpoint); it needs %s", path, ", ".join(needed))
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({_reason(e2)})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_reason(e)})") from None


def _unsafe_globals(path: Path) -> list[str]:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # the scan is only for the error message
        return []


def to_plain(obj: Any) -> Any:
    """Turn loaded configs into plain Python: Namespace -> dict, omegaconf stand-ins -> dict/list/values."""
    if isinstance(obj, argparse.Namespace):
        return {k: to_plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, OmegaDictConfig):
        content = obj.__dict__.get("_content")
        return {str(k): to_plain(v) for k, v in content.items()} if isinstance(content, Mapping) else content
    if isinstance(obj, OmegaListConfig):
        content = obj.__dict__.get("_content")
        return [to_plain(v) for v in content] if isinstance(content, list | tuple) else content
    if isinstance(obj, OmegaNode):
        return to_plain(obj.__dict__.get("_val"))
    if isinstance(obj, FairseqChoice):
        return str(obj)
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_plain(v) for v in obj)
    return obj





# ---------------------------------------------------------------------------------------------------------------
# Format detection
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DetectedCheckpoint:
    """What a checkpoint path holds: its format, model family and (for pickles) the loaded payload."""

    path: Path
    format: str  # speechbench | hf-dir | fairseq | unilm | s3prl
    family: str  # a registered family: wav2vec2 | hubert | wavlm | data2vec_audio | distilhubert | apc | cpc
    payload: Any = None  # the loaded pickle (fairseq / s3prl); None for directories
    sha256: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.format} checkpoint of a {self.family} model"


def weight_file(directory: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    return None


def read_speechbench_json(directory: Path) -> dict:
    path = directory / SPEECHBENCH_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if meta.get("family") not in family_names():
        raise CheckpointError(f"{path}: 'family' must be one of {', '.join(family_names())}; got "
                              f"{meta.get('family')!r}")
    return meta


PRETRAIN_UPSTREAM_DIR, PRETRAIN_CONFIG = "upstream", "pretrain.json"  # what `bench pretrain --out DIR` writes


def pretrain_upstream_dir(path: Path) -> Path | None:
    """``DIR/upstream`` when ``path`` is a ``bench pretrain --out DIR`` folder, else None."""
    if (path / SPEECHBENCH_JSON).is_file() or (path / "config.json").is_file():
        return None
    if (path / PRETRAIN_UPSTREAM_DIR / SPEECHBENCH_JSON).is_file():
        return path / PRETRAIN_UPSTREAM_DIR
    if (path / PRETRAIN_CONFIG).is_file():
        raise CheckpointError(f"{path}: a bench pretrain folder without a saved upstream yet ({PRETRAIN_UPSTREAM_DIR}/ "
                              f"is written at the first save); resume the pretraining or wait for its first save")
    return None


def _detect_directory(path: Path) -> DetectedCheckpoint:
    inner = pretrain_upstream_dir(path)
    if inner is not None:
        log.info("%s: a bench pretrain folder; using its %s/", path, PRETRAIN_UPSTREAM_DIR)
        path = inner
    weights = weight_file(path)
    if (path / SPEECHBENCH_JSON).is_file():
        meta = read_speechbench_json(path)
        if not (path / "config.json").is_file() or weights is None:
            raise CheckpointError(f"{path}: speechbench checkpoint needs config.json and model.safetensors beside "
                                  f"{SPEECHBENCH_JSON}; found {', '.join(sorted(p.name for p in path.iterdir()))}")
        return DetectedCheckpoint(path, "speechbench", meta["family"], sha256=sha256_file(weights), info=meta)
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path / 'config.json'}: unreadable ({type(e).__name__}: {e})") from None
        model_type = config.get("model_type")
        family = family_for_model_type(model_type)
        if family is None:
            raise CheckpointError(f"{path}: HF directory of model_type {model_type!r}; supported: "
                                  f"{', '.join(hf_model_types())}")
        if weights is None:
            raise CheckpointError(f"{path}: HF directory without weights (expected one of {', '.join(WEIGHT_FILES)})")
        return DetectedCheckpoint(path, "hf-dir", family.name, sha256=sha256_file(weights))
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise CheckpointError(f"{path}: unknown checkpoint directory (expected an HF directory with config.json, ours "
                          f"with {SPEECHBENCH_JSON}, or a bench pretrain --out folder); found {found}")


def _fairseq_family(payload: Mapping) -> str | None:
    from speechbench.upstreams.fairseq_convert import fairseq_family

    return fairseq_family(payload)


def classify_payload(payload: Any) -> tuple[str, str] | None:
    """``(format, family)`` of a loaded pickle, or None when the layout is unknown."""
    if not isinstance(payload, Mapping):
        return None
    keys = set(payload)
    if {"task_cfg", "model_cfg", "model_weight"} <= keys:  # s3prl's converted wav2vec2 / HuBERT / data2vec
        family = _fairseq_family({"cfg": {"model": to_plain(payload["model_cfg"])}, "model": payload["model_weight"]})
        if "dictionaries_symbols" in keys:
            family = "hubert"
        return ("s3prl", family) if family else None
    if "model" in keys and ("cfg" in keys or "args" in keys):
        from speechbench.upstreams.fairseq_convert import is_flat_unilm_cfg

        family = _fairseq_family(payload)
        unilm = family == "wavlm" and is_flat_unilm_cfg(to_plain(payload.get("cfg")))
        return ("unilm" if unilm else "fairseq", family) if family else None
    if {"Config", "Distiller"} <= keys:  # s3prl's distiller (DistilHuBERT)
        return "s3prl", "distilhubert"
    config = to_plain(payload.get("config"))
    if isinstance(config, Mapping):
        if "model" in keys and isinstance(config.get("model"), Mapping) and "paras" in config["model"]:
            return "s3prl", "apc"
        if "weights" in keys:
            return "s3prl", "cpc"
    return None


KNOWN_LAYOUTS = ("fairseq {cfg|args, model}", "unilm WavLM {cfg, model}",
                 "s3prl converted {task_cfg, model_cfg, model_weight}", "s3prl DistilHuBERT {Config, Distiller}",
                 "s3prl APC {config, model}", "s3prl/libri-light CPC {config, weights}")


def detect_checkpoint(path: str | os.PathLike, trust: bool = False) -> DetectedCheckpoint:
    """Detect the format and model family of a local checkpoint (file or directory); log what was found."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found (expected a file or directory at this path)")
    if path.is_dir():
        detected = _detect_directory(path)
    else:
        if path.suffix == ".safetensors":
            raise CheckpointError(f"{path}: a bare .safetensors file has no model config; pass the directory that "
                                  f"holds it with config.json (HF or ours with {SPEECHBENCH_JSON})")
        if path.suffix in (".json", ".yaml", ".yml"):
            raise CheckpointError(f"{path}: a config file, not a checkpoint; pass its directory or the weights file")
        payload = safe_torch_load(path, trust=trust)
        kind = classify_payload(payload)
        if kind is None:
            top = ", ".join(sorted(map(str, payload))[:10]) if isinstance(payload, Mapping) else type(payload).__name__
            raise CheckpointError(f"{path}: unknown checkpoint layout (top-level: {top}); known: "
                                  f"{'; '.join(KNOWN_LAYOUTS)}, or an HF/speechbench directory")
        detected = DetectedCheckpoint(path, kind[0], kind[1], payload=payload, sha256=sha256_file(path))
    log.info("%s: detected %s", path, detected.label)
    return detected


# ---------------------------------------------------------------------------------------------------------------
# Our own format
# ---------------------------------------------------------------------------------------------------------------





def save_speechbench_checkpoint(out_dir: str | os.PathLike, family: str, config: dict,
                                state_dict: Mapping[str, torch.Tensor], extra: dict | None = None) -> Path:
    """Write our format: ``config.json`` + ``model.safetensors`` + ``speechbench.json`` (written last).

    For ``apc``/``cpc``, ``config`` is the module config (:class:`upstreams.apc.APCConfig` /
    :class:`upstreams.cpc.CPCConfig` as a dict) and ``state_dict`` uses s3prl's key names. For wav2vec2/HuBERT use
    :func:`upstreams.hf.save_hf_checkpoint`, which writes an HF directory plus ``speechbench.json``.
    """
    from safetensors.torch import save

    get_family(family)  # a registered family, or a one-line error listing them
    out_dir = Path(out_dir)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    meta = {"format": "speechbench", "format_version": FORMAT_VERSION, "family": family, **(extra or {})}
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True))
    atomic_write_bytes(out_dir / "model.safetensors", save(tensors, metadata={"family": family}))
    atomic_write_text(out_dir / SPEECHBENCH_JSON, json.dumps(meta, indent=2, sort_keys=True))  # last: marks it complete
    return out_dir


def config_from_dict(cls: type, d: Mapping, what: str) -> Any:
    """A config dataclass from our ``config.json`` (``what``: "APC", ...): every key must be one of its fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise CheckpointError(f"{what} config has unknown key(s) {unknown}; known: {sorted(names)}")
    return cls(**dict(d))


def load_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, what: str) -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch (missing, unexpected or misshapen weights) is a
    one-line :class:`CheckpointError` naming ``source``."""
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(f"{source}: weights do not match the {what} its config describes "
                              f"({'; '.join(lines[1:])[:240]})") from None


def write_speechbench_json(out_dir: str | os.PathLike, family: str, extra: dict | None = None) -> None:
    meta = {"format": "speechbench", "format_version": FORMAT_VERSION, "family": family, **(extra or {})}
    atomic_write_text(Path(out_dir) / SPEECHBENCH_JSON, json.dumps(meta, indent=2, sort_keys=True))


def load_speechbench_checkpoint(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read ``config.json`` and ``model.safetensors`` of our format: ``(config, state_dict)``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: unreadable ({type(e).__name__}: {e})") from None
    return config, load_file(str(directory / "model.safetensors"))
