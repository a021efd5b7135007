"""CPC pretraining: InfoNCE over ``prediction_steps`` future encoder frames (modified CPC, CPC_audio's objective).

The trained network is :class:`upstreams.cpc.CPCModel` (conv encoder ``z`` + causal LSTM context ``c``), fed the raw
waveform exactly as :class:`upstreams.cpc.CPCUpstream` feeds it at evaluation time (no normalisation). For every
step ``k = 1..K`` a linear predictor ``W_k`` maps ``c[t]`` to a guess of ``z[t + k]``; the candidates are the true
``z[t + k]`` (index 0) and ``num_negatives`` encoder frames drawn uniformly from the whole batch (other utterances
and other times; drawn with torch's RNG, which the loop checkpoints). Scores are dot products; the loss is the
cross-entropy of picking index 0, averaged over all valid ``(b, t, k)``. The per-position negatives are shared by
the ``K`` steps (as CPC_audio does), which keeps them one ``[B, T, N, C]`` tensor.

Initialisation (see :class:`CPCObjective`): the first conv's bias starts at zero and the predictors start at zero;
with CPCModel's default first-conv bias every initial frame is nearly the same vector and training sits at chance.

The predictors are objective-only: the export holds the ``CPCModel`` weights alone (s3prl's key names).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from speechbench.upstreams.checkpoints import save_speechbench_checkpoint
from speechbench.upstreams.cpc import MIN_SAMPLES, CPCConfig, CPCModel
from speechbench.upstreams.features import length_mask
from speechbench.upstreams.pretrain.base import Objective, ObjectiveOutput, register_objective


@dataclass(frozen=True)
class CPCModelOptions:
    """The recipe's ``model`` section: :class:`upstreams.cpc.CPCConfig` with the small bundled size as defaults.

    Defaults give ~117k exported parameters (96/96: ~261k at twice the step time; the strided convs on the raw
    waveform dominate the cost); 256/256 is s3prl's published size. The upstream exposes the encoder
    and the context output at one width, so ``hidden_encoder`` must equal ``hidden_gar``.
    """

    hidden_encoder: int = 64
    hidden_gar: int = 64
    n_levels_gru: int = 1
    ar_mode: str = "LSTM"
    norm_mode: str = "layerNorm"

    def to_config(self) -> CPCConfig:
        return CPCConfig(**asdict(self))


@dataclass(frozen=True)
class CPCObjectiveOptions:
    prediction_steps: int = 12  # K future frames (120 ms), CPC_audio's nPredicts
    num_negatives: int = 64  # per position; CPC_audio uses 128, halved to keep the [B, T, N, C] tensor small


def info_nce_from_scores(scores: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE from candidate scores ``[..., 1 + N]`` with the positive at index 0: ``(loss, accuracy)``.

    ``mask`` ``[...]`` (bool) selects the positions averaged over; accuracy is the fraction whose top score is the
    positive strictly (a tie with a negative counts as wrong).
    """
    flat = scores.reshape(-1, scores.shape[-1])
    keep = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device) if mask is None else mask.reshape(-1)
    flat = flat[keep]
    if flat.shape[0] == 0:
        zero = scores.sum() * 0.0
        return zero, zero.detach()
    target = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
    loss = F.cross_entropy(flat, target)
    with torch.no_grad():
        accuracy = (flat[:, 0] > flat[:, 1:].max(dim=-1).values).float().mean()
    return loss, accuracy


def info_nce(predictions: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of dot-product scores: ``predictions`` ``[..., D]``, ``positives`` ``[..., D]``, ``negatives``
    ``[..., N, D]`` -> ``(loss, accuracy)`` (mean cross-entropy of the positive among ``1 + N`` candidates)."""
    positive = (predictions * positives).sum(-1, keepdim=True)  # [..., 1]
    negative = torch.matmul(negatives, predictions[..., None]).squeeze(-1)  # [..., N]
    return info_nce_from_scores(torch.cat([positive, negative], dim=-1), mask)


def sample_negatives(encoded: torch.Tensor, frames: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """``num_negatives`` frames per position of ``encoded`` ``[B, T, C]``, uniform over the batch's valid frames.

    Returns ``[B, T, N, C]``. Uses torch's global RNG. A draw may hit the positive itself (probability
    ``1 / (valid frames)``), as in CPC_audio; it only makes that position's task slightly harder.
    """
    b, t, c = encoded.shape
    valid = length_mask(frames, t).reshape(-1).nonzero().squeeze(-1)  # flat indices of real frames
    pick = valid[torch.randint(len(valid), (b, t, num_negatives), device=encoded.device)]
    return encoded.reshape(b * t, c)[pick]


class CPCObjective(Objective):
    """``forward(wavs [B, S], wav_lengths [B]) -> ObjectiveOutput(loss, {"accuracy"})``."""

    family = "cpc"

    def __init__(self, config: CPCConfig, options: CPCObjectiveOptions) -> None:
        super().__init__()
        self.config, self.options = config, options
        self.model = CPCModel(config)
        # The first conv sees the raw waveform (std ~0.01-0.05): its default bias (uniform +-1/sqrt(10)) is ~10x its
        # response, so after ChannelNorm every frame starts as nearly the same vector (the bias pattern). Then the
        # context barely varies either, E[(z_pos - z_neg) c^T] (all the predictors can learn) is ~0, and training
        # sits at log(N + 1) whatever the predictor init, score scaling or negatives. With a zero bias the first
        # ChannelNorm sees the waveform's shape alone (loudness-invariant but for its eps, like wav2vec 2.0's
        # bias-free conv encoder). The bias stays trainable and exported: only the initial value changes.
        nn.init.zeros_(self.model.gEncoder.conv0.bias)
        self.predictors = nn.ModuleList(nn.Linear(config.hidden_gar, config.hidden_encoder, bias=False)
                                        for _ in range(options.prediction_steps))
        for predictor in self.predictors:
            # Zero, not nn.Linear's random init: random predictors score the positive below chance, and the quickest
            # way out is collapsing the encoder frames onto one vector (they recover only ~10 steps later on the
            # tiny corpus). From zero the first step teaches the predictors E[(z_pos - z_neg) c^T] and the
            # encoder/context gradients follow from the second step. No bias: a per-step constant guess cannot
            # tell candidates apart.
            nn.init.zeros_(predictor.weight)

    def encode(self, wavs: torch.Tensor, wav_lengths: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(context [B, T, H], encoded [B, T, C], frames [B])``, the way :class:`CPCUpstream` runs the model."""
        wav_lengths = torch.as_tensor(wav_lengths, device=wavs.device).long()
        wavs = wavs.float() * (torch.arange(wavs.shape[1], device=wavs.device)[None, :] < wav_lengths[:, None])
        if wavs.shape[1] < MIN_SAMPLES:
            wavs = F.pad(wavs, (0, MIN_SAMPLES - wavs.shape[1]))
        return self.model(wavs[:, None, :], wav_lengths.clamp_min(MIN_SAMPLES))

    def forward(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> ObjectiveOutput:
        context, encoded, frames = self.encode(wavs, wav_lengths)
        total = int(frames.max())
        context, encoded = context[:, :total], encoded[:, :total]
        steps = self.options.prediction_steps
        predictions = torch.stack([p(context) for p in self.predictors], dim=2)  # [B, T, K, C]
        padded = F.pad(encoded, (0, 0, 0, steps))  # room for t + k beyond the end (masked out below)
        positives = torch.stack([padded[:, k: k + total] for k in range(1, steps + 1)], dim=2)  # [B, T, K, C]
        negatives = sample_negatives(encoded, frames, self.options.num_negatives)  # [B, T, N, C]
        positive = (predictions * positives).sum(-1, keepdim=True)  # [B, T, K, 1]
        negative = torch.matmul(predictions, negatives.transpose(2, 3))  # [B, T, K, N]: one set per (b, t)
        ahead = torch.arange(total, device=wavs.device)[None, :, None] + torch.arange(1, steps + 1,
                                                                                       device=wavs.device)
        mask = ahead < frames[:, None, None]  # [B, T, K]: t + k is a real frame
        loss, accuracy = info_nce_from_scores(torch.cat([positive, negative], dim=-1), mask)
        return ObjectiveOutput(loss, {"accuracy": float(accuracy)})

    def export(self, out_dir: Path, meta: dict) -> None:
        save_speechbench_checkpoint(out_dir, "cpc", asdict(self.config), self.model.state_dict(), extra=meta)


@register_objective("cpc", CPCModelOptions, CPCObjectiveOptions)
def build_cpc(model_options: CPCModelOptions, objective_options: CPCObjectiveOptions, seed: int) -> CPCObjective:
    """A CPC objective with reproducible random initialisation (``torch.manual_seed(seed)`` first)."""
    if model_options.hidden_encoder != model_options.hidden_gar:
        raise ValueError(f"cpc model.hidden_encoder ({model_options.hidden_encoder}) must equal model.hidden_gar "
                         f"({model_options.hidden_gar}): the upstream exposes both layers at one width")
    if objective_options.prediction_steps < 1 or objective_options.num_negatives < 1:
        raise ValueError(f"cpc objective needs prediction_steps >= 1 and num_negatives >= 1; got "
                         f"{objective_options.prediction_steps}, {objective_options.num_negatives}")
    torch.manual_seed(seed)
    return CPCObjective(model_options.to_config(), objective_options)
