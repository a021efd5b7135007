"""Task heads shared by several tasks."""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean over valid frames: ``x [B, T, D]``, ``lengths [B]`` -> ``[B, D]``."""
    mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    mask = mask.to(x.dtype).unsqueeze(-1)
    return (x * mask).sum(dim=1) / lengths.clamp(min=1).to(x.dtype)[:, None]


class UtteranceLevelHead(nn.Module):
    """SUPERB's utterance-level head: Linear(D, P) -> masked mean over time -> Linear(P, C).

    ``forward(x, lengths)``: x ``[B, T, D]`` with lengths ``[B]``, or pooled ``[B, D]`` with ``lengths=None``.
    The projector is affine and the mean is linear, so projecting then averaging equals averaging then
    projecting: the pooled path computes exactly the same logits ``[B, C]`` from per-utterance time-means.
    """

    def __init__(self, input_dim: int, projector_dim: int, num_classes: int):
        super().__init__()
        self.projector = nn.Linear(input_dim, projector_dim)
        self.classifier = nn.Linear(projector_dim, num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        projected = self.projector(x)
        if x.dim() == 3:
            if lengths is None:
                raise ValueError("frame-level input [B, T, D] needs lengths [B]")
            projected = masked_mean(projected, lengths)
        return self.classifier(projected)
