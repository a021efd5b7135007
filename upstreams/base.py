"""The upstream contract: a frozen model that maps waveforms to layer-wise hidden states.

Every upstream declares its attributes up front (they are never discovered by a dummy forward):

- ``name``: registry name or checkpoint label.
- ``sample_rate``: input sample rate in Hz (16000 for every built-in upstream).
- ``num_layers``: L, the number of hidden states exposed (13 for a Base transformer, counting the
  CNN/projection output the way HF ``hidden_states`` does; 1 for FBANK).
- ``hidden_size``: D, the width of every hidden state.
- ``downsample_rate``: input samples per output frame (160 for 10 ms frames, 320 for wav2vec2/HuBERT).

``forward(wavs [B, S], wav_lengths [B]) -> UpstreamOutput(hidden [B, L, T, D], lengths [B])``.
Frames at or beyond ``lengths[b]`` are padding and carry no meaning. Upstreams are frozen: ``eval()``,
``requires_grad_(False)``, and callers run them under ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class UpstreamOutput:
    """Layer-wise hidden states with their valid frame counts.

    hidden: ``[B, L, T, D]`` float tensor.
    lengths: ``[B]`` int64 tensor, valid frames per utterance (``<= T``).
    """

    hidden: torch.Tensor
    lengths: torch.Tensor


@runtime_checkable
class Upstream(Protocol):
    name: str
    sample_rate: int
    num_layers: int
    hidden_size: int
    downsample_rate: int

    def __call__(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> UpstreamOutput: ...


@dataclass(frozen=True)
class UpstreamEntry:
    """A registered upstream: how to build it and what to tell a user about it."""

    name: str
    build: Callable[..., Upstream]
    summary: str
    needs_weights: bool = False


UPSTREAMS: dict[str, UpstreamEntry] = {}


def register_upstream(name: str, summary: str, needs_weights: bool = False):
    """Decorator registering a builder ``build(**options) -> Upstream`` under ``name``."""

    def wrap(build: Callable[..., Upstream]) -> Callable[..., Upstream]:
        if name in UPSTREAMS:
            raise ValueError(f"upstream {name!r} is registered twice")
        UPSTREAMS[name] = UpstreamEntry(name, build, summary, needs_weights)
        return build

    return wrap


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Put a module in eval mode with gradients off (the frozen-upstream rule)."""
    module.eval()
    module.requires_grad_(False)
    return module
