"""The one weighted-sum module every task uses (SUPERB's featurizer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightedLayerSum(nn.Module):
    """Softmax-weighted sum over the L hidden states of a frozen upstream.

    Input ``[B, L, T, D]`` (frames) or ``[B, L, D]`` (per-layer time-means, the pooled cache) -> ``[B, T, D]``
    or ``[B, D]``. Weights start at zero (uniform softmax). With ``layer`` set, that single hidden state is
    passed through and nothing is learned (layer-wise probing). With one layer the input passes through.

    ``layer_norm`` normalises every layer over D before the sum (off by default, as in SUPERB). It is not
    linear, so it is refused on pooled input: the time-mean of normalised frames is not the normalised mean.
    """

    def __init__(self, num_layers: int, layer_norm: bool = False, layer: int | None = None):
        super().__init__()
        if layer is not None and not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} out of range: the upstream has {num_layers} hidden states "
                             f"(0..{num_layers - 1})")
        self.num_layers = num_layers
        self.layer_norm = layer_norm
        self.layer = layer
        self.weights = nn.Parameter(torch.zeros(num_layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[1] != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers in dim 1, got shape {tuple(hidden.shape)}")
        if self.layer is not None:
            return hidden[:, self.layer]
        if self.num_layers == 1:
            return hidden[:, 0]
        if self.layer_norm:
            if hidden.dim() != 4:
                raise ValueError("layer_norm needs frame-level input [B, L, T, D], not pooled means")
            hidden = F.layer_norm(hidden, hidden.shape[-1:])
        norm_weights = F.softmax(self.weights, dim=0)
        shape = (1, self.num_layers) + (1,) * (hidden.dim() - 2)
        return (hidden * norm_weights.view(shape)).sum(dim=1)

    def layer_weights(self) -> list[float]:
        """The normalised weights a result reports (one-hot when a single layer is used)."""
        if self.layer is not None:
            return [float(i == self.layer) for i in range(self.num_layers)]
        return F.softmax(self.weights.detach(), dim=0).tolist()
