"""The pretraining-objective contract and its registry.

An objective is an ``nn.Module`` holding everything that is trained (the upstream model plus objective-only parts
such as APC's postnet, CPC's per-step predictors, wav2vec 2.0's quantiser, HuBERT's label embeddings):

- ``forward(wavs [B, S], wav_lengths [B]) -> ObjectiveOutput(loss: scalar tensor, stats: dict[str, float])``.
  The loop feeds equal-length crops (``wav_lengths`` all equal to ``S``), 16 kHz float32 in [-1, 1], un-normalised;
  an objective normalises the waveform itself when its model expects it.
- ``prepare(batches, log)``: called once before step 0 (never on resume, so whatever it computes must live in the
  module's ``state_dict``, e.g. k-means centroids as buffers). ``batches`` yields ``(wavs [B, S], wav_lengths [B])``
  crops drawn from the training data. Default: nothing.
- ``export(out_dir, meta)``: write the trained upstream into the empty directory ``out_dir`` in the format the
  upstream loaders read (ours: :func:`upstreams.checkpoints.save_speechbench_checkpoint` for APC/CPC,
  :func:`upstreams.hf.save_hf_checkpoint` for wav2vec2/HuBERT); ``meta`` goes into ``speechbench.json``.

Families register with :func:`register_objective`, giving the frozen dataclasses of their two recipe sections:
``model`` (architecture) and ``objective`` (loss settings). The builder gets parsed instances of both and a seed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from speechbench.common import UnknownNameError
from speechbench.upstreams.families import pretrain_families


@dataclass
class ObjectiveOutput:
    """A scalar training loss and float statistics for the log (e.g. accuracy, perplexity, loss terms)."""

    loss: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class of the four objectives (see the module docstring for the contract)."""

    family: str = ""

    def prepare(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], log: Callable[[str], None]) -> None:
        """One-off preparation before step 0 (default: none)."""

    def export(self, out_dir: Path, meta: dict) -> None:  # pragma: no cover - every family overrides it
        raise NotImplementedError


@dataclass(frozen=True)
class ObjectiveEntry:
    family: str
    model_options: type  # frozen dataclass of the recipe's ``model`` section
    objective_options: type  # frozen dataclass of the recipe's ``objective`` section
    build: Callable[..., Objective]  # build(model_options, objective_options, seed) -> Objective


OBJECTIVES: dict[str, ObjectiveEntry] = {}


def register_objective(family: str, model_options: type, objective_options: type):
    """Decorator registering ``build(model_options, objective_options, seed) -> Objective`` for ``family``."""

    def wrap(build: Callable[..., Objective]) -> Callable[..., Objective]:
        if family in OBJECTIVES:
            raise ValueError(f"pretraining objective {family!r} is registered twice")
        OBJECTIVES[family] = ObjectiveEntry(family, model_options, objective_options, build)
        return build

    return wrap


def get_objective(family: str) -> ObjectiveEntry:
    """The registered objective of ``family``: a family registered with ``pretrain=True``, whose module
    ``upstreams/pretrain/<family>.py`` is imported on first use."""
    available = pretrain_families()
    if family not in available:
        raise UnknownNameError(f"unknown pretraining model {family!r}; available: {', '.join(available)}")
    importlib.import_module(f"speechbench.upstreams.pretrain.{family}")
    return OBJECTIVES[family]
