"""The upstream contract: a frozen model that maps waveforms to layer-wise hidden states.

Every upstream declares its attributes up front (they are never discovered by a dummy forward):

- ``name``: registry name or checkpoint label.
- ``sample_rate``: input sample rate in Hz (16000 for every built-in upstream).
- ``num_layers``: L, the number of hidden states exposed (13 for a Base transformer, counting the
  CNN/projection output the way HF ``hidden_states`` does; 1 for FBANK).
- ``hidden_size``: D, the width of every hidden state.
- ``downsample_rate``: input samples per output frame (160 for 10 ms frames, 320 for wav2vec2/HuBERT).

Upstreams with weights also declare where they came from (optional attributes; a weight-free upstream leaves them
unset and :func:`describe_upstream` fills the defaults):

- ``family``: the registered model family (``upstreams/families.py``), or None for weight-free upstreams.
- ``checkpoint_format``: ``speechbench`` | ``hf-dir`` | ``fairseq`` | ``s3prl`` | ... (``builtin`` if no weights).
- ``checkpoint_sha256``: sha256 of the weights file, or None.
- ``settings``: a JSON-able dict of everything else that changes the outputs (normalisation, feature config).

:func:`describe_upstream` is the one place that reads these attributes: results, cache keys, extracted features and
``bench check-upstream`` all use its record.

``forward(wavs [B, S], wav_lengths [B]) -> UpstreamOutput(hidden [B, L, T, D], lengths [B])``.
Frames at or beyond ``lengths[b]`` are padding and carry no meaning. Upstreams are frozen: ``eval()``,
``requires_grad_(False)``, and callers run them under ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from speechbench.common import SpeechbenchError


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
    params_m: float | None = None  # millions of parameters (cards: tests/benchmarks/card_costs.py)
    gflops_per_s: float | None = None  # GFLOPs per second of audio


UPSTREAMS: dict[str, UpstreamEntry] = {}


def register_upstream(name: str, summary: str, needs_weights: bool = False):
    """Decorator registering a builder ``build(**options) -> Upstream`` under ``name``."""

    def wrap(build: Callable[..., Upstream]) -> Callable[..., Upstream]:
        if name in UPSTREAMS:
            raise ValueError(f"upstream {name!r} is registered twice")
        UPSTREAMS[name] = UpstreamEntry(name, build, summary, needs_weights)
        return build

    return wrap


REQUIRED_ATTRIBUTES = ("sample_rate", "num_layers", "hidden_size", "downsample_rate")
OPTIONAL_ATTRIBUTES = {"family": None, "checkpoint_format": "builtin", "checkpoint_sha256": None, "settings": None}


class UpstreamContractError(SpeechbenchError):
    """An upstream whose declared attributes break the contract (missing, wrong type, not positive)."""


def describe_upstream(upstream: Upstream) -> dict:
    """The upstream's identity as plain data: ``name``, the four declared sizes, and the optional checkpoint facts
    (``family``, ``checkpoint_format``, ``checkpoint_sha256``, ``settings``) with their defaults.

    Raises :class:`UpstreamContractError` (one line) when a declared attribute is missing or not a positive integer.
    """
    name = getattr(upstream, "name", None)
    if not isinstance(name, str) or not name:
        raise UpstreamContractError(f"upstream {type(upstream).__name__}: 'name' must be a non-empty string, got "
                                    f"{name!r}")
    values = {k: getattr(upstream, k, None) for k in REQUIRED_ATTRIBUTES}
    bad = [k for k, v in values.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
    if bad:
        raise UpstreamContractError(f"upstream {name}: attribute(s) {', '.join(bad)} missing or not a positive "
                                    f"integer ({values})")
    optional = {k: getattr(upstream, k, default) for k, default in OPTIONAL_ATTRIBUTES.items()}
    return {"name": name, **values, **optional}


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Put a module in eval mode with gradients off (the frozen-upstream rule)."""
    module.eval()
    module.requires_grad_(False)
    return module
