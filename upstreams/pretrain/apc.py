"""APC pretraining: predict the log-mel frame ``n_future`` steps ahead from a causal GRU stack (s3prl's objective).

The trained network is :class:`upstreams.apc.APC` itself (GRU stack + ``postnet``), fed the features the APC
upstream computes at evaluation time (:func:`upstreams.apc.apc_features`: Hamming-window Kaldi log-mel + per-utterance
CMVN), so the exported checkpoint sees the same inputs it was trained on. The loss is s3prl's: L1 between the postnet
output at frame ``t`` and the input frame ``t + n_future``, averaged over valid frames and mel bins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from speechbench.common import SAMPLE_RATE
from speechbench.upstreams.apc import APC, APCConfig, apc_features, n_fft_for
from speechbench.upstreams.checkpoints import save_speechbench_checkpoint
from speechbench.upstreams.features import kaldi_mel_banks, length_mask
from speechbench.upstreams.pretrain.base import Objective, ObjectiveOutput, register_objective


@dataclass(frozen=True)
class APCModelOptions:
    """The recipe's ``model`` section: :class:`upstreams.apc.APCConfig` with the small bundled size as defaults.

    Defaults give ~289k parameters (3 x GRU 128 + postnet); ``hidden_size=512`` is s3prl's published size.
    """

    input_size: int = 80
    hidden_size: int = 128
    num_layers: int = 3
    dropout: float = 0.0  # s3prl uses 0.1 at 512; the small model trained briefly underfits rather than overfits
    residual: bool = True
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    cmvn: bool = True

    def to_config(self) -> APCConfig:
        return APCConfig(**asdict(self))


@dataclass(frozen=True)
class APCObjectiveOptions:
    n_future: int = 3  # predict frame t + n_future from the context at t (s3prl's published model used 5)


def apc_loss(predicted: torch.Tensor, feats: torch.Tensor, lengths: torch.Tensor, n_future: int) -> torch.Tensor:
    """Mean L1 between ``predicted[b, t]`` and ``feats[b, t + n_future]`` over valid ``t`` and all mel bins.

    ``predicted``, ``feats``: ``[B, T, M]``; ``lengths``: valid frames ``[B]``. Position ``t`` of utterance ``b``
    counts when ``t + n_future < lengths[b]``; an utterance too short for any pair contributes nothing.
    """
    if n_future < 1:
        raise ValueError(f"n_future must be >= 1; got {n_future}")
    steps = feats.shape[1] - n_future
    if steps <= 0:
        return predicted.sum() * 0.0  # keeps the graph: a batch too short to predict anything
    mask = length_mask(lengths - n_future, steps).to(feats.dtype)[..., None]  # [B, T - n, 1]
    error = (predicted[:, :steps] - feats[:, n_future:]).abs() * mask
    count = mask.sum() * feats.shape[-1]
    return error.sum() / count.clamp_min(1.0)


class APCObjective(Objective):
    """``forward(wavs [B, S], wav_lengths [B]) -> ObjectiveOutput(loss, {"copy_l1"})``.

    ``copy_l1`` is the same L1 for the trivial prediction "frame t + n equals frame t": a model that has learned
    anything beats it.
    """

    family = "apc"

    def __init__(self, config: APCConfig, options: APCObjectiveOptions) -> None:
        super().__init__()
        self.config, self.options = config, options
        self.model = APC(config)
        # the same feature front end as upstreams.apc.APCUpstream (not saved: derived from the config)
        frame_length = round(config.frame_length_ms * SAMPLE_RATE / 1000)
        window = torch.hamming_window(frame_length, periodic=False, alpha=0.54, beta=0.46, dtype=torch.float64)
        self.register_buffer("window", window.float(), persistent=False)
        banks = kaldi_mel_banks(config.input_size, n_fft_for(frame_length), sample_rate=SAMPLE_RATE)
        self.register_buffer("mel_banks", banks, persistent=False)

    def features(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input features ``[B, T, M]`` and frame counts ``[B]``, exactly as the APC upstream computes them."""
        with torch.no_grad():
            return apc_features(wavs.float(), torch.as_tensor(wav_lengths).long(), self.config, self.window,
                                self.mel_banks)

    def forward(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> ObjectiveOutput:
        feats, counts = self.features(wavs, wav_lengths)
        predicted, _ = self.model(feats, counts)
        n = self.options.n_future
        loss = apc_loss(predicted, feats, counts, n)
        with torch.no_grad():
            copy_l1 = apc_loss(feats, feats, counts, n)
        return ObjectiveOutput(loss, {"copy_l1": float(copy_l1)})

    def export(self, out_dir: Path, meta: dict) -> None:
        save_speechbench_checkpoint(out_dir, "apc", asdict(self.config), self.model.state_dict(), extra=meta)


@register_objective("apc", APCModelOptions, APCObjectiveOptions)
def build_apc(model_options: APCModelOptions, objective_options: APCObjectiveOptions, seed: int) -> APCObjective:
    """An APC objective with reproducible random initialisation (``torch.manual_seed(seed)`` first)."""
    if objective_options.n_future < 1:
        raise ValueError(f"apc objective.n_future must be >= 1; got {objective_options.n_future}")
    torch.manual_seed(seed)
    return APCObjective(model_options.to_config(), objective_options)

