"""APC (autoregressive predictive coding) as a native PyTorch upstream, s3prl's published architecture.

s3prl ``upstream/apc``: input features are Kaldi filterbanks from ``torchaudio.compliance.kaldi.fbank`` with a
**Hamming** window (not Kaldi's default povey), 80 mel bins, 25 ms / 10 ms frames, ``snip_edges``, no dither, then
per-utterance CMVN ``(x - mean_t) / (1e-10 + std_t)`` with the unbiased (N - 1) standard deviation
(``config["data"]["audio"]``: ``feat_type: fbank, feat_dim: 80, frame_length: 25, frame_shift: 10``, ``cmvn``
default true). The model (``config["model"]["paras"]``: ``num_layers 3, hidden_size 512, dropout 0.1,
residual true``) is a stack of unidirectional single-layer GRUs ``rnn_layers.{i}`` (input 80 -> 512 -> 512),
each layer after the first adding its input (residual), and a ``postnet`` Linear(512, 80) predicting the frame
``n_future`` steps ahead (pre-training only). s3prl exposes the output of every GRU layer (after the residual):
3 hidden states of 512 at 10 ms.

Checkpoints: s3prl ``{"config": {"model": {"paras": {...}}, "data": {"audio": {...}}, ...}, "model": state_dict}``
with keys ``rnn_layers.{i}.{weight,bias}_{ih,hh}_l0`` and ``postnet.{weight,bias}``; ours is ``config.json``
(:class:`APCConfig`) + ``model.safetensors`` with the same keys + ``speechbench.json``. VQ-APC is not supported.

Batch invariance: features use each utterance's own frames and statistics; the GRUs are causal, so trailing
padding never reaches a valid frame. Inputs shorter than one 25 ms frame are zero-padded to one frame.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from speechbench.common import SAMPLE_RATE
from speechbench.upstreams.base import UpstreamOutput, freeze
from speechbench.upstreams.checkpoints import CheckpointError, DetectedCheckpoint, config_from_dict, load_weights
from speechbench.upstreams.families import register_family
from speechbench.upstreams.features import (
    frame_waves,
    kaldi_mel_banks,
    kaldi_power_spectrum,
    length_mask,
    log_mel_from_power,
)

CMVN_EPS = 1e-10


@dataclass(frozen=True)
class APCConfig:
    """APC architecture and input features (defaults: s3prl's published ``apc_360hr``)."""

    input_size: int = 80  # mel bins (s3prl feat_dim)
    hidden_size: int = 512
    num_layers: int = 3
    dropout: float = 0.1
    residual: bool = True
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    cmvn: bool = True

    @classmethod
    def from_dict(cls, d: Mapping) -> APCConfig:
        return config_from_dict(cls, d, "APC")

    @classmethod
    def from_s3prl(cls, config: Mapping) -> APCConfig:
        """From s3prl's checkpoint ``config`` (``model.paras`` and ``data.audio``)."""
        try:
            paras = dict(config["model"]["paras"])
            audio = dict(config.get("data", {}).get("audio", {}))
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError("s3prl APC checkpoint without config.model.paras") from None
        if paras.get("vq"):
            raise CheckpointError("VQ-APC checkpoints are not supported (only plain APC)")
        if audio.get("feat_type", "fbank") != "fbank":
            raise CheckpointError(f"APC input features {audio.get('feat_type')!r} are not supported (only fbank)")
        return cls(input_size=int(audio.get("feat_dim", 80)), hidden_size=int(paras["hidden_size"]),
                   num_layers=int(paras["num_layers"]), dropout=float(paras.get("dropout", 0.0)),
                   residual=bool(paras.get("residual", False)),
                   frame_length_ms=float(audio.get("frame_length", 25.0)),
                   frame_shift_ms=float(audio.get("frame_shift", 10.0)), cmvn=bool(audio.get("cmvn", True)))

    def to_s3prl(self) -> dict:
        """The ``config`` sub-dict of an s3prl APC checkpoint."""
        return {"model": {"paras": {"num_layers": self.num_layers, "hidden_size": self.hidden_size,
                                    "dropout": self.dropout, "residual": self.residual}},
                "data": {"audio": {"feat_type": "fbank", "feat_dim": self.input_size,
                                   "frame_length": self.frame_length_ms, "frame_shift": self.frame_shift_ms,
                                   "decode_wav": False, "cmvn": self.cmvn}},
                "task": {"sequence_length": 1500, "n_future": 5}}


class APC(nn.Module):
    """Unidirectional GRU stack with residual connections and a regression postnet (s3prl's key layout).

    ``forward(feats [B, T, M], lengths [B]) -> (predicted [B, T, M], hiddens: list of L [B, T, H])``;
    values at padded frames are meaningless (the callers mask them).
    """

    def __init__(self, config: APCConfig) -> None:
        super().__init__()
        self.config = config
        sizes = [config.input_size] + [config.hidden_size] * config.num_layers
        self.rnn_layers = nn.ModuleList(nn.GRU(sizes[i], sizes[i + 1], batch_first=True)
                                        for i in range(config.num_layers))
        self.rnn_dropout = nn.Dropout(config.dropout)
        self.postnet = nn.Linear(config.hidden_size, config.input_size)

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hiddens = []
        x = feats
        for i, rnn in enumerate(self.rnn_layers):
            y, _ = rnn(x)
            y = self.rnn_dropout(y)
            if self.config.residual and i > 0:
                y = y + x
            hiddens.append(y)
            x = y
        return self.postnet(x), hiddens


def n_fft_for(frame_length: int) -> int:
    """Kaldi's ``round_to_power_of_two``: the FFT size for a frame (512 for 400 samples)."""
    return 1 << (frame_length - 1).bit_length()


def apc_features(wavs: torch.Tensor, wav_lengths: torch.Tensor, config: APCConfig, window: torch.Tensor,
                 mel_banks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s3prl's APC input: Hamming-window Kaldi log-mel + per-utterance CMVN. ``[B, S] -> [B, T, M]``, frames ``[B]``.

    Padded frames are 0. CMVN uses each utterance's valid frames, unbiased std (N - 1, floored at N = 2) + 1e-10.
    """
    frame_length = round(config.frame_length_ms * SAMPLE_RATE / 1000)
    frame_shift = round(config.frame_shift_ms * SAMPLE_RATE / 1000)
    frames, counts = frame_waves(wavs, wav_lengths, frame_length, frame_shift)
    power, _ = kaldi_power_spectrum(frames, window, n_fft_for(frame_length))
    feats = log_mel_from_power(power, mel_banks)
    mask = length_mask(counts, feats.shape[1]).to(feats.dtype)[..., None]
    if config.cmvn:
        n = counts.to(feats.dtype)[:, None, None]
        mean = (feats * mask).sum(1, keepdim=True) / n
        centered = (feats - mean) * mask
        std = (centered.square().sum(1, keepdim=True) / (n - 1).clamp_min(1.0)).sqrt()
        feats = centered / (CMVN_EPS + std)
    return feats * mask, counts


class APCUpstream(nn.Module):
    """APC behind the upstream contract: ``forward(wavs [B, S], wav_lengths [B]) -> hidden [B, L, T, H]``.

    ``L = num_layers`` (3), ``H = hidden_size`` (512), 10 ms frames: ``lengths = 1 + (max(S, 400) - 400) // 160``.
    """

    sample_rate: int = SAMPLE_RATE

    def __init__(self, model: APC, name: str = "apc", checkpoint_format: str = "random",
                 checkpoint_sha256: str | None = None) -> None:
        super().__init__()
        config = model.config
        self.model = freeze(model)
        self.name, self.family = name, "apc"
        self.num_layers, self.hidden_size = config.num_layers, config.hidden_size
        self.downsample_rate = round(config.frame_shift_ms * SAMPLE_RATE / 1000)
        self.frame_length = round(config.frame_length_ms * SAMPLE_RATE / 1000)
        self.checkpoint_format, self.checkpoint_sha256 = checkpoint_format, checkpoint_sha256
        self.settings = dataclasses.asdict(config)
        window = torch.hamming_window(self.frame_length, periodic=False, alpha=0.54, beta=0.46, dtype=torch.float64)
        self.register_buffer("window", window.float(), persistent=False)
        banks = kaldi_mel_banks(config.input_size, n_fft_for(self.frame_length), sample_rate=SAMPLE_RATE)
        self.register_buffer("mel_banks", banks, persistent=False)
        self.eval()

    def frame_lengths(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        """``1 + (max(S, frame_length) - frame_length) // frame_shift`` (Kaldi ``snip_edges``, at least 1)."""
        n = torch.as_tensor(wav_lengths).long().clamp_min(self.frame_length)
        return 1 + torch.div(n - self.frame_length, self.downsample_rate, rounding_mode="floor")

    def forward(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> UpstreamOutput:
        if wavs.dim() != 2:
            raise ValueError(f"{self.name}: wavs must be [B, S]; got shape {tuple(wavs.shape)}")
        wav_lengths = torch.as_tensor(wav_lengths, device=wavs.device).long()
        feats, counts = apc_features(wavs.float(), wav_lengths, self.model.config, self.window, self.mel_banks)
        _, hiddens = self.model(feats, counts)
        hidden = torch.stack(hiddens, dim=1)  # [B, L, T, H]
        mask = length_mask(counts, hidden.shape[2]).to(hidden.dtype)[:, None, :, None]
        return UpstreamOutput(hidden=hidden * mask, lengths=counts)


def apc_from_s3prl(payload: Mapping, name: str, source: str, checkpoint_format: str = "s3prl",
                   sha256: str | None = None) -> APCUpstream:
    """From an s3prl APC checkpoint dict ``{"config", "model"}``."""
    from speechbench.upstreams.checkpoints import to_plain

    model = APC(APCConfig.from_s3prl(to_plain(payload["config"])))
    load_weights(model, payload["model"], source, "APC")
    return APCUpstream(model, name, checkpoint_format, sha256)


def apc_from_ours(config: Mapping, state: Mapping[str, torch.Tensor], name: str, source: str,
                  sha256: str | None = None) -> APCUpstream:
    model = APC(APCConfig.from_dict(config))
    load_weights(model, state, source, "APC")
    return APCUpstream(model, name, "speechbench", sha256)


def apc_s3prl_checkpoint(model: APC) -> dict:
    """The s3prl layout of a model: ``{"config": ..., "model": state_dict}`` (for ``torch.save``)."""
    return {"config": model.config.to_s3prl(), "model": model.state_dict()}


@register_family("apc", "APC", "autoregressive predictive coding: a unidirectional GRU stack on log-mel frames; hidden "
                 "states: the RNN layers' outputs", pretrain=True)
def load_apc(detected: DetectedCheckpoint, name: str) -> APCUpstream:
    """The family loader: our format (``config.json`` + ``model.safetensors``) or an s3prl ``{config, model}``."""
    from speechbench.upstreams.checkpoints import load_speechbench_checkpoint

    if detected.format == "speechbench":
        return apc_from_ours(*load_speechbench_checkpoint(detected.path), name, str(detected.path), detected.sha256)
    return apc_from_s3prl(detected.payload, name, str(detected.path), detected.format, detected.sha256)
