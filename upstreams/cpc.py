"""Modified CPC (libri-light / CPC_audio) as a native PyTorch upstream, s3prl's ``modified_cpc`` architecture.

s3prl ``upstream/cpc`` builds ``CPCModel(gEncoder=CPCEncoder(hiddenEncoder, normMode), gAR=CPCAR(...))``:

- encoder: five Conv1d on the raw waveform ``[B, 1, S]`` with (kernel, stride, padding) = (10, 5, 3), (8, 4, 2),
  (4, 2, 1), (4, 2, 1), (4, 2, 1) (160x downsampling: 10 ms frames), each followed by a normalisation and ReLU.
  The "modified" CPC normalises with ``ChannelNorm`` (``normMode: layerNorm``): per frame over channels, with the
  unbiased variance, eps 1e-5, affine ``[1, C, 1]`` weight and bias. Keys ``gEncoder.conv{i}.{weight,bias}``,
  ``gEncoder.batchNorm{i}.{weight,bias}``;
- autoregressive context network ``gAR.baseNet``: an LSTM (``arMode`` LSTM, s3prl's default; GRU/RNN also load)
  of ``nLevelsGRU`` layers, ``hiddenEncoder -> hiddenGar``.

s3prl exposes two hidden states: the encoder output and the context (AR) output, both ``[B, T, 256]`` for the
published checkpoint. Checkpoints: libri-light/s3prl ``{"config": {hiddenEncoder, hiddenGar, nLevelsGRU, arMode,
normMode, ...}, "weights": CPCModel state_dict}``; ours is ``config.json`` (:class:`CPCConfig`) + ``model.safetensors``
with the same keys + ``speechbench.json``.

Frames: the conv arithmetic ``n <- (n + 2 p - k) // s + 1`` per layer (inputs shorter than 160 samples are
zero-padded to 160: one frame). Batch invariance is exact: between conv layers every position beyond an
utterance's own valid length is zeroed, which is what that utterance's conv zero-padding sees when alone, and the
AR network is causal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from speechbench.common import SAMPLE_RATE
from speechbench.upstreams.base import UpstreamOutput, freeze
from speechbench.upstreams.checkpoints import CheckpointError, DetectedCheckpoint, config_from_dict, load_weights
from speechbench.upstreams.families import register_family

CONV_SPECS = ((10, 5, 3), (8, 4, 2), (4, 2, 1), (4, 2, 1), (4, 2, 1))  # (kernel, stride, padding)
MIN_SAMPLES = 160  # shortest input giving one frame through the five convs
AR_MODES = ("LSTM", "GRU", "RNN")
NORM_MODES = ("layerNorm", "ID", "batchNorm")


@dataclass(frozen=True)
class CPCConfig:
    """Modified-CPC architecture (defaults: s3prl's ``get_default_cpc_config``)."""

    hidden_encoder: int = 256
    hidden_gar: int = 256
    n_levels_gru: int = 1
    ar_mode: str = "LSTM"
    norm_mode: str = "layerNorm"

    def __post_init__(self) -> None:
        if self.ar_mode not in AR_MODES:
            raise CheckpointError(f"CPC arMode {self.ar_mode!r} is not supported; supported: {', '.join(AR_MODES)}")
        if self.norm_mode not in NORM_MODES:
            raise CheckpointError(f"CPC normMode {self.norm_mode!r} is not supported (instanceNorm mixes frames); "
                                  f"supported: {', '.join(NORM_MODES)}")

    @classmethod
    def from_dict(cls, d: Mapping) -> CPCConfig:
        return config_from_dict(cls, d, "CPC")

    @classmethod
    def from_s3prl(cls, config: Mapping) -> CPCConfig:
        """From the libri-light/s3prl ``config`` dict (CPC_audio argument names; missing keys take s3prl defaults)."""
        if config.get("encoder_type", "cpc") != "cpc":
            raise CheckpointError(f"CPC encoder_type {config.get('encoder_type')!r} is not supported (only cpc)")
        if config.get("cpc_mode") == "reverse":
            raise CheckpointError("reverse CPC is not causal and is not supported")
        return cls(hidden_encoder=int(config.get("hiddenEncoder", 256)), hidden_gar=int(config.get("hiddenGar", 256)),
                   n_levels_gru=int(config.get("nLevelsGRU", 1)), ar_mode=str(config.get("arMode", "LSTM")),
                   norm_mode=str(config.get("normMode", "layerNorm")))

    def to_s3prl(self) -> dict:
        return {"hiddenEncoder": self.hidden_encoder, "hiddenGar": self.hidden_gar, "nLevelsGRU": self.n_levels_gru,
                "arMode": self.ar_mode, "normMode": self.norm_mode, "encoder_type": "cpc", "cpc_mode": None,
                "samplingType": "samespeaker"}


class ChannelNorm(nn.Module):
    """Per-frame normalisation over channels of ``[B, C, T]`` (unbiased variance), affine ``[1, C, 1]``."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def conv_lengths(lengths: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    return torch.div(lengths + 2 * padding - kernel, stride, rounding_mode="floor") + 1


class CPCEncoder(nn.Module):
    """Strided conv encoder: ``[B, 1, S]`` (+ lengths ``[B]``) -> ``[B, C, T]`` (+ frame lengths ``[B]``)."""

    def __init__(self, hidden: int, norm_mode: str = "layerNorm") -> None:
        super().__init__()
        norm = {"layerNorm": ChannelNorm, "batchNorm": nn.BatchNorm1d, "ID": lambda c: nn.Identity()}[norm_mode]
        for i, (k, s, p) in enumerate(CONV_SPECS):
            self.add_module(f"conv{i}", nn.Conv1d(1 if i == 0 else hidden, hidden, k, stride=s, padding=p))
            self.add_module(f"batchNorm{i}", norm(hidden))
        self.dim_encoded = hidden

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        for i, spec in enumerate(CONV_SPECS):
            x = F.relu(getattr(self, f"batchNorm{i}")(getattr(self, f"conv{i}")(x)))
            if lengths is not None:
                lengths = conv_lengths(lengths, *spec)
                x = x * (torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]).to(x.dtype)[:, None]
        return x, lengths


class CPCAR(nn.Module):
    """Causal context network ``baseNet`` (LSTM/GRU/RNN): ``[B, T, C] -> [B, T, H]``."""

    def __init__(self, dim_in: int, dim_out: int, num_layers: int, mode: str = "LSTM") -> None:
        super().__init__()
        rnn = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}[mode]
        self.baseNet = rnn(dim_in, dim_out, num_layers=num_layers, batch_first=True)  # noqa: N815 (s3prl key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.baseNet(x)[0]


class CPCModel(nn.Module):
    """``gEncoder`` + ``gAR`` with s3prl's key names.

    ``forward(wavs [B, 1, S], lengths [B] or None) -> (context [B, T, H], encoded [B, T, C], frame lengths)``.
    """

    def __init__(self, config: CPCConfig) -> None:
        super().__init__()
        self.config = config
        self.gEncoder = CPCEncoder(config.hidden_encoder, config.norm_mode)  # noqa: N815 (s3prl key)
        self.gAR = CPCAR(config.hidden_encoder, config.hidden_gar, config.n_levels_gru, config.ar_mode)  # noqa: N815

    def forward(self, wavs: torch.Tensor, lengths: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        encoded, frames = self.gEncoder(wavs, lengths)
        encoded = encoded.transpose(1, 2)
        return self.gAR(encoded), encoded, frames


class CPCUpstream(nn.Module):
    """Modified CPC behind the upstream contract: ``hidden [B, 2, T, D]`` = (encoder output, context output)."""

    sample_rate: int = SAMPLE_RATE
    num_layers: int = 2
    downsample_rate: int = 160

    def __init__(self, model: CPCModel, name: str = "cpc", checkpoint_format: str = "random",
                 checkpoint_sha256: str | None = None) -> None:
        super().__init__()
        config = model.config
        if config.hidden_encoder != config.hidden_gar:
            raise CheckpointError(f"CPC with hiddenEncoder {config.hidden_encoder} != hiddenGar {config.hidden_gar} "
                                  f"cannot expose both layers at one width")
        self.model = freeze(model)
        self.name, self.family = name, "cpc"
        self.hidden_size = config.hidden_encoder
        self.checkpoint_format, self.checkpoint_sha256 = checkpoint_format, checkpoint_sha256
        self.settings = dataclasses.asdict(config)

    def frame_lengths(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        """The conv arithmetic of the five encoder layers (inputs shorter than 160 samples count as 160)."""
        n = torch.as_tensor(wav_lengths).long().clamp_min(MIN_SAMPLES)
        for spec in CONV_SPECS:
            n = conv_lengths(n, *spec)
        return n

    def forward(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> UpstreamOutput:
        if wavs.dim() != 2:
            raise ValueError(f"{self.name}: wavs must be [B, S]; got shape {tuple(wavs.shape)}")
        wav_lengths = torch.as_tensor(wav_lengths, device=wavs.device).long()
        wavs = wavs.float() * (torch.arange(wavs.shape[1], device=wavs.device)[None, :] < wav_lengths[:, None])
        if wavs.shape[1] < MIN_SAMPLES:
            wavs = F.pad(wavs, (0, MIN_SAMPLES - wavs.shape[1]))
        context, encoded, frames = self.model(wavs[:, None, :], wav_lengths.clamp_min(MIN_SAMPLES))
        hidden = torch.stack([encoded, context], dim=1)  # [B, 2, T, D]
        valid = torch.arange(hidden.shape[2], device=wavs.device)[None, :] < frames[:, None]
        hidden = hidden * valid[:, None, :, None].to(hidden.dtype)
        total = int(frames.max()) if frames.numel() else 0
        return UpstreamOutput(hidden=hidden[:, :, :total], lengths=frames)


def _load_state(model: CPCModel, state: Mapping[str, torch.Tensor], source: str, strict: bool) -> None:
    ours = set(model.state_dict())
    load_weights(model, {k: v for k, v in state.items() if k in ours or strict}, source, "CPC")


def cpc_from_s3prl(payload: Mapping, name: str, source: str, sha256: str | None = None) -> CPCUpstream:
    """From a libri-light/s3prl CPC checkpoint ``{"config", "weights"}`` (extra keys ignored, as s3prl does)."""
    from speechbench.upstreams.checkpoints import to_plain

    model = CPCModel(CPCConfig.from_s3prl(to_plain(payload["config"])))
    _load_state(model, payload["weights"], source, strict=False)
    return CPCUpstream(model, name, "s3prl", sha256)


def cpc_from_ours(config: Mapping, state: Mapping[str, torch.Tensor], name: str, source: str,
                  sha256: str | None = None) -> CPCUpstream:
    model = CPCModel(CPCConfig.from_dict(config))
    _load_state(model, state, source, strict=True)
    return CPCUpstream(model, name, "speechbench", sha256)


def cpc_s3prl_checkpoint(model: CPCModel) -> dict:
    """The libri-light/s3prl layout of a model: ``{"config": ..., "weights": state_dict}`` (for ``torch.save``)."""
    return {"config": model.config.to_s3prl(), "weights": model.state_dict()}


@register_family("cpc", "modified CPC", "contrastive predictive coding (libri-light's modified CPC): strided CNN "
                 "encoder and LSTM context; hidden states: encoder output and context output", pretrain=True)
def load_cpc(detected: DetectedCheckpoint, name: str) -> CPCUpstream:
    """The family loader: our format or a libri-light/s3prl ``{config, weights}``."""
    from speechbench.upstreams.checkpoints import load_speechbench_checkpoint

    if detected.format == "speechbench":
        return cpc_from_ours(*load_speechbench_checkpoint(detected.path), name, str(detected.path), detected.sha256)
    return cpc_from_s3prl(detected.payload, name, str(detected.path), detected.sha256)
