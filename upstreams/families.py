"""Model families: the one registry that every place which enumerates families reads.

A family is a model architecture with checkpoints (wav2vec 2.0, HuBERT, WavLM, data2vec-audio, DistilHuBERT, APC,
CPC). Its module registers a loader with :func:`register_family`; checkpoint detection, cards, ``bench pretrain
--model`` and the bundled upstreams all ask this registry rather than keeping their own list. Adding a family is its
module (plus one line in ``BUILTIN_FAMILY_MODULES``) and a card in ``upstreams/cards/``; see docs/extending.md.

Weight-free upstreams (``fbank`` ...) are not families: they register with
:func:`speechbench.upstreams.base.register_upstream`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from speechbench.common import UnknownNameError

if TYPE_CHECKING:
    from speechbench.upstreams.base import Upstream
    from speechbench.upstreams.checkpoints import DetectedCheckpoint

# Modules whose import registers the built-in families (imported on first lookup, so this module stays light).
BUILTIN_FAMILY_MODULES = ("speechbench.upstreams.hf", "speechbench.upstreams.apc", "speechbench.upstreams.cpc",
                          "speechbench.upstreams.distilhubert")


@dataclass(frozen=True)
class Family:
    """A registered model family.

    load(detected, name) -> Upstream: builds the frozen upstream of a detected checkpoint of this family (any of
        the formats its module understands: HF directory, fairseq or s3prl pickle, our own format).
    hf_model_type / hf_model_class: the ``model_type`` of its HF ``config.json`` and the ``transformers`` class
        that loads it (``"HubertModel"``), for families served through transformers; None otherwise.
    pretrain: it has a native objective in ``upstreams/pretrain/<name>.py`` (``bench pretrain --model <name>``).
    """

    name: str
    title: str  # how papers write it: "wav2vec 2.0"
    summary: str
    load: Callable[[DetectedCheckpoint, str], Upstream]
    hf_model_type: str | None = None
    hf_model_class: str | None = None
    pretrain: bool = False


FAMILIES: dict[str, Family] = {}


def register_family(name: str, title: str, summary: str, hf_model_type: str | None = None,
                    hf_model_class: str | None = None, pretrain: bool = False):
    """Decorator registering ``load(detected, name) -> Upstream`` as the loader of family ``name``."""

    def wrap(load: Callable[[DetectedCheckpoint, str], Upstream]) -> Callable[[DetectedCheckpoint, str], Upstream]:
        if name in FAMILIES:
            raise ValueError(f"model family {name!r} is registered twice")
        FAMILIES[name] = Family(name, title, summary, load, hf_model_type, hf_model_class, pretrain)
        return load

    return wrap


def _load_builtin_families() -> None:
    for module in BUILTIN_FAMILY_MODULES:
        importlib.import_module(module)


def list_families() -> list[Family]:
    """Every registered family, by name."""
    _load_builtin_families()
    return [FAMILIES[n] for n in sorted(FAMILIES)]


def family_names() -> tuple[str, ...]:
    return tuple(f.name for f in list_families())


def get_family(name: str) -> Family:
    _load_builtin_families()
    if name not in FAMILIES:
        raise UnknownNameError(f"unknown model family {name!r}; available: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def family_for_model_type(model_type: str | None) -> Family | None:
    """The family whose HF ``config.json`` has this ``model_type``, or None."""
    return next((f for f in list_families() if model_type and f.hf_model_type == model_type), None)


def hf_model_types() -> tuple[str, ...]:
    return tuple(f.hf_model_type for f in list_families() if f.hf_model_type)


def pretrain_families() -> tuple[str, ...]:
    """Families with a native pretraining objective, in a fixed order (``bench pretrain --model``)."""
    return tuple(f.name for f in list_families() if f.pretrain)
