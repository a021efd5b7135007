"""Weight-free Kaldi-style feature upstreams: ``fbank`` (the SUPERB FBANK baseline), ``fbank_no_cmvn`` and ``mfcc``.

All three expose one hidden state (``num_layers = 1``) of 10 ms frames (``downsample_rate = 160``) at 16 kHz:

- ``fbank``: 80 Kaldi log-mel filterbanks + deltas + delta-deltas, per-utterance CMVN -> 240-d;
- ``fbank_no_cmvn``: the same 240-d features without the normalisation;
- ``mfcc``: 13 Kaldi MFCCs (23 mel bins, orthonormal DCT-II, cepstral lifter 22; c0 is the 0-th cepstral
  coefficient, ``torchaudio.compliance.kaldi.mfcc``'s default ``use_energy=False`` that s3prl's ``mfcc`` uses, not
  the Kaldi binary's log energy) + deltas + delta-deltas, per-utterance CMVN -> 39-d.

Each matches s3prl's ``upstream/baseline`` (``fbank.yaml``, ``fbank_no_cmvn.yaml``, ``mfcc.yaml``: torchaudio's
Kaldi-compliance features with their defaults, ``ComputeDeltas(win_length=5)`` twice, CMVN with the unbiased std).

``forward(wavs [B, S] float, wav_lengths [B] int64) -> UpstreamOutput(hidden [B, 1, T, D], lengths [B])`` with
``lengths[b] = 1 + (max(wav_lengths[b], 400) - 400) // 160`` and ``T = max(lengths)``; frames at or beyond
``lengths[b]`` are 0. Each utterance is processed as if it were alone (own frame count, deltas replicate its own
edge frames, CMVN statistics over its own valid frames). The signal processing lives in :mod:`upstreams.features`.
"""

from __future__ import annotations

import torch
from torch import nn

from speechbench.common import SAMPLE_RATE
from speechbench.upstreams.base import UpstreamOutput, freeze, register_upstream
from speechbench.upstreams.features import (
    FRAME_LENGTH,
    FRAME_SHIFT,
    add_deltas,
    cepstral_lifter,
    dct_matrix,
    frame_waves,
    kaldi_log_mel,
    kaldi_mel_banks,
    kaldi_power_spectrum,
    length_mask,
    log_mel_from_power,
    masked_cmvn,
    povey_window,
)

__all__ = ["KaldiFeatureUpstream", "build_fbank", "build_fbank_no_cmvn", "build_mfcc", "kaldi_log_mel"]


FBANK_SUMMARY = (
    "SUPERB FBANK baseline: 80 Kaldi log-mel + deltas + delta-deltas, per-utterance CMVN (240-d, 10 ms). CMVN zeroes\n"
    "each feature's time-mean and the utterance head is linear up to its time-mean, so all clips get one prediction:\n"
    "KS/IC/SID score one class's share of the test set (published KS floor 8.63 %). Use fbank_no_cmvn to learn."
)
FBANK_NO_CMVN_SUMMARY = (
    "80 Kaldi log-mel + deltas + delta-deltas without per-utterance CMVN (240-d, 10 ms): the weight-free baseline that "
    "learns\non utterance-level tasks (fbank's CMVN makes every clip pool to the same input)."
)
MFCC_SUMMARY = (
    "13 Kaldi MFCCs (c0 = cepstral c0, as s3prl's) + deltas + delta-deltas, per-utterance CMVN (39-d, 10 ms). As with\n"
    "fbank, CMVN zeroes each feature's time-mean, so every clip gets one prediction from an utterance-level head:\n"
    "KS/IC/SID score one class's share of the test set. Use fbank_no_cmvn for a weight-free baseline that learns."
)


class KaldiFeatureUpstream(nn.Module):
    """A frozen, weight-free Kaldi feature extractor as an upstream.

    ``forward(wavs [B, S], wav_lengths [B]) -> UpstreamOutput(hidden [B, 1, T, D], lengths [B])`` where ``D`` is
    ``3 * num_mel_bins`` (filterbanks) or ``3 * num_ceps`` (MFCCs) and ``T`` the most valid 10 ms frames in the batch.
    """

    sample_rate: int = SAMPLE_RATE
    num_layers: int = 1
    downsample_rate: int = FRAME_SHIFT

    def __init__(
        self,
        name: str,
        kind: str = "fbank",
        cmvn: bool = True,
        num_mel_bins: int = 80,
        num_ceps: int = 13,
        cepstral_lifter_q: float = 22.0,
    ) -> None:
        super().__init__()
        if kind not in ("fbank", "mfcc"):
            raise ValueError(f"kind must be 'fbank' or 'mfcc'; got {kind!r}")
        self.name = name
        self.kind = kind
        self.cmvn = cmvn
        self.num_mel_bins = num_mel_bins
        base_dim = num_mel_bins if kind == "fbank" else num_ceps
        self.hidden_size = 3 * base_dim
        self.register_buffer("window", povey_window(FRAME_LENGTH), persistent=False)
        self.register_buffer("mel_banks", kaldi_mel_banks(num_mel_bins, sample_rate=SAMPLE_RATE), persistent=False)
        if kind == "mfcc":
            self.register_buffer("dct", dct_matrix(num_ceps, num_mel_bins), persistent=False)
            self.register_buffer("lifter", cepstral_lifter(num_ceps, cepstral_lifter_q), persistent=False)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, kind={self.kind!r}, cmvn={self.cmvn}, hidden_size={self.hidden_size}"

    def features(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Static features before deltas: ``[B, S] -> ([B, T, num_mel_bins or num_ceps], frame counts [B])``."""
        frames, counts = frame_waves(wavs, wav_lengths)
        power, _ = kaldi_power_spectrum(frames, self.window)
        feats = log_mel_from_power(power, self.mel_banks)
        if self.kind == "mfcc":
            feats = torch.matmul(feats, self.dct) * self.lifter  # c0 stays the cepstral c0 (use_energy=False)
        return feats, counts

    def forward(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> UpstreamOutput:
        if wavs.dim() != 2:
            raise ValueError(f"{self.name}: wavs must be [B, S]; got shape {tuple(wavs.shape)}")
        wav_lengths = torch.as_tensor(wav_lengths, device=wavs.device).long()
        if wav_lengths.shape != (wavs.shape[0],):
            raise ValueError(f"{self.name}: wav_lengths must be [B={wavs.shape[0]}]; got {tuple(wav_lengths.shape)}")
        if wavs.shape[0] and (int(wav_lengths.min()) < 1 or int(wav_lengths.max()) > wavs.shape[1]):
            raise ValueError(f"{self.name}: wav_lengths must lie in [1, {wavs.shape[1]}]; got {wav_lengths.tolist()}")
        feats, counts = self.features(wavs.to(torch.float32), wav_lengths)
        feats = add_deltas(feats, counts)
        if self.cmvn:
            feats = masked_cmvn(feats, counts)  # zeroes padded frames itself
        else:
            feats = feats * length_mask(counts, feats.shape[1]).to(feats.dtype)[..., None]
        return UpstreamOutput(hidden=feats.unsqueeze(1), lengths=counts)


def _check_no_options(name: str, options: dict) -> None:
    if options:
        raise ValueError(f"upstream {name!r} takes no options; got {sorted(options)}")


@register_upstream("fbank", summary=FBANK_SUMMARY)
def build_fbank(**options) -> KaldiFeatureUpstream:
    """The SUPERB FBANK baseline: 80 log-mel + deltas + delta-deltas with per-utterance CMVN (240-d)."""
    _check_no_options("fbank", options)
    return freeze(KaldiFeatureUpstream("fbank", kind="fbank", cmvn=True))


@register_upstream("fbank_no_cmvn", summary=FBANK_NO_CMVN_SUMMARY)
def build_fbank_no_cmvn(**options) -> KaldiFeatureUpstream:
    """80 log-mel + deltas + delta-deltas without normalisation (240-d)."""
    _check_no_options("fbank_no_cmvn", options)
    return freeze(KaldiFeatureUpstream("fbank_no_cmvn", kind="fbank", cmvn=False))


@register_upstream("mfcc", summary=MFCC_SUMMARY)
def build_mfcc(**options) -> KaldiFeatureUpstream:
    """13 Kaldi MFCCs (c0 = cepstral c0, as s3prl) + deltas + delta-deltas with per-utterance CMVN (39-d)."""
    _check_no_options("mfcc", options)
    return freeze(KaldiFeatureUpstream("mfcc", kind="mfcc", cmvn=True, num_mel_bins=23, num_ceps=13))
