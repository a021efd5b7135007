"""Kaldi-style speech features in pure torch: framing, log-mel filterbanks, MFCCs, deltas and CMVN.

Everything here is vectorised over utterances and frames (framing with ``unfold``; no Python loop over frames)
and respects per-utterance lengths, so a padded batch gives the same valid frames as one utterance at a time.

Conventions follow Kaldi's ``compute-fbank-feats`` / ``compute-mfcc-feats`` with ``dither=0``, as written out by
``torchaudio.compliance.kaldi`` with its defaults (what s3prl's ``fbank`` and ``mfcc`` baselines call):

- frames of ``frame_length`` samples every ``frame_shift`` samples with ``snip_edges=True``:
  ``T = 1 + (S - frame_length) // frame_shift``; an input shorter than one frame is zero-padded to one frame;
- per frame: DC-offset removal, pre-emphasis ``x[i] -= 0.97 * x[i - 1]`` (``x[0] -= 0.97 * x[0]``), povey window
  (symmetric Hann to the power 0.85), zero-padding to ``n_fft`` (512), power spectrum;
- triangular mel filters on the Kaldi mel scale ``1127 ln(1 + f / 700)`` between ``low_freq`` (20 Hz) and
  Nyquist, triangular in mel space;
- natural log with an energy floor of float32 machine epsilon;
- deltas with a 5-frame regression window replicating the edge frames; per-utterance CMVN with the unbiased std
  plus 1e-10 (s3prl's ``CMVN``).

Waveforms are used at the scale they are given (float in [-1, 1], as s3prl passes them to torchaudio; int16 scale in
the Kaldi binaries): this only shifts every log-energy by a constant, which per-utterance CMVN removes.
One difference from torchaudio: an input shorter than one frame gives one zero-padded frame here and no frame there.
"""

from __future__ import annotations

import math

import torch

FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms at 16 kHz
N_FFT = 512
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
ENERGY_FLOOR = float(torch.finfo(torch.float32).eps)  # Kaldi's std::numeric_limits<float>::epsilon()
CMVN_EPS = 1e-10  # s3prl upstream/baseline CMVN: (x - mean) / (eps + std)
CMVN_CONSTANT_BELOW = 1e-5  # a std this small is round-off of a constant feature


def kaldi_mel(freq: torch.Tensor | float) -> torch.Tensor:
    """Hertz -> Kaldi mel: ``1127 * ln(1 + f / 700)``."""
    return 1127.0 * torch.log1p(torch.as_tensor(freq, dtype=torch.float64) / 700.0)


def povey_window(length: int = FRAME_LENGTH, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kaldi's povey window: a symmetric Hann window raised to the power 0.85. Shape ``[length]``."""
    n = torch.arange(length, dtype=torch.float64)
    hann = 0.5 - 0.5 * torch.cos(2.0 * math.pi * n / (length - 1))
    return hann.pow(0.85).to(dtype)


def kaldi_mel_banks(
    num_bins: int,
    n_fft: int = N_FFT,
    sample_rate: int = 16000,
    low_freq: float = LOW_FREQ,
    high_freq: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Triangular mel filters, triangular in Kaldi mel space. Shape ``[n_fft // 2 + 1, num_bins]``.

    ``high_freq`` defaults to Nyquist. Filter ``m`` rises from mel edge ``m`` to ``m + 1`` and falls to ``m + 2``,
    the ``num_bins + 2`` edges being evenly spaced in mel between ``low_freq`` and ``high_freq``.
    """
    nyquist = sample_rate / 2.0
    high = nyquist if high_freq is None else high_freq
    if not 0.0 <= low_freq < high <= nyquist:
        raise ValueError(f"mel filters need 0 <= low_freq < high_freq <= {nyquist}; got {low_freq}, {high}")
    edges = torch.linspace(kaldi_mel(low_freq).item(), kaldi_mel(high).item(), num_bins + 2, dtype=torch.float64)
    bin_mel = kaldi_mel(torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft)[:, None]
    left, center, right = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    rising = (bin_mel - left) / (center - left)
    falling = (right - bin_mel) / (right - center)
    return torch.minimum(rising, falling).clamp_min(0.0).to(dtype)


def dct_matrix(num_ceps: int, num_mel_bins: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The first ``num_ceps`` rows of the orthonormal DCT-II (Kaldi's ``ComputeDctMatrix``), transposed.

    Shape ``[num_mel_bins, num_ceps]`` so that ``log_mel @ dct_matrix(...)`` gives cepstra.
    """
    n = torch.arange(num_mel_bins, dtype=torch.float64)[:, None]
    k = torch.arange(num_ceps, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi / num_mel_bins * (n + 0.5) * k) * math.sqrt(2.0 / num_mel_bins)
    basis[:, 0] = math.sqrt(1.0 / num_mel_bins)
    return basis.to(dtype)


def cepstral_lifter(num_ceps: int, q: float = 22.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kaldi's cepstral liftering coefficients ``1 + q / 2 * sin(pi * i / q)``. Shape ``[num_ceps]``."""
    i = torch.arange(num_ceps, dtype=torch.float64)
    return (1.0 + 0.5 * q * torch.sin(math.pi * i / q)).to(dtype)


def num_frames(
    wav_lengths: torch.Tensor, frame_length: int = FRAME_LENGTH, frame_shift: int = FRAME_SHIFT
) -> torch.Tensor:
    """Valid frames per utterance with ``snip_edges=True``, at least 1: ``1 + (max(S, L) - L) // shift``."""
    return 1 + (wav_lengths.clamp_min(frame_length) - frame_length) // frame_shift


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B, max_len]`` bool mask, True on the first ``lengths[b]`` positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def frame_waves(
    wavs: torch.Tensor,
    wav_lengths: torch.Tensor,
    frame_length: int = FRAME_LENGTH,
    frame_shift: int = FRAME_SHIFT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut padded waveforms ``[B, S]`` into frames ``[B, T, frame_length]`` (``T`` = most valid frames).

    Samples at or beyond ``wav_lengths[b]`` are zeroed first, so a clip shorter than one frame is zero-padded exactly
    as it would be on its own. Returns the frames (a fresh tensor) and the valid frame counts ``[B]``.
    """
    counts = num_frames(wav_lengths, frame_length, frame_shift)
    total = int(counts.max()) if counts.numel() else 1
    needed = (total - 1) * frame_shift + frame_length
    wavs = wavs[:, :needed] * length_mask(wav_lengths, min(needed, wavs.shape[1])).to(wavs.dtype)
    if wavs.shape[1] < needed:
        wavs = torch.nn.functional.pad(wavs, (0, needed - wavs.shape[1]))
    return wavs.unfold(1, frame_length, frame_shift), counts


def kaldi_power_spectrum(
    frames: torch.Tensor,
    window: torch.Tensor,
    n_fft: int = N_FFT,
    preemphasis: float = PREEMPHASIS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kaldi's per-frame processing of ``frames [..., L]``.

    Returns the power spectrum ``[..., n_fft // 2 + 1]`` (after DC-offset removal, pre-emphasis, window and
    zero-padding to ``n_fft``) and the raw log energy ``[...]`` (Kaldi's ``raw_energy=True``: sum of squares after
    DC-offset removal, before pre-emphasis and window, floored at float eps).
    """
    frames = frames - frames.mean(dim=-1, keepdim=True)
    log_energy = frames.square().sum(dim=-1).clamp_min(ENERGY_FLOOR).log()
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
    frames = (frames - preemphasis * previous) * window
    spectrum = torch.fft.rfft(frames, n=n_fft)
    return spectrum.real.square() + spectrum.imag.square(), log_energy


def log_mel_from_power(power: torch.Tensor, mel_banks: torch.Tensor) -> torch.Tensor:
    """``log(max(power @ mel_banks, float eps))``: ``[..., F] -> [..., num_bins]``."""
    return torch.matmul(power, mel_banks).clamp_min(ENERGY_FLOOR).log()


def kaldi_log_mel(wav: torch.Tensor, num_mel_bins: int = 80) -> torch.Tensor:
    """Kaldi log-mel filterbank of one 16 kHz waveform ``[S]`` -> ``[T, num_mel_bins]``, ``T = 1 + (S - 400) // 160``.

    25 ms povey-windowed frames every 10 ms (``snip_edges=True``), DC-offset removal, pre-emphasis 0.97, power
    spectrum with n_fft 512, mel filters from 20 Hz to Nyquist, natural log floored at float eps, no dither.
    """
    if wav.dim() != 1:
        raise ValueError(f"kaldi_log_mel expects one waveform [S]; got shape {tuple(wav.shape)}")
    wav = wav.to(torch.float32)
    frames, _ = frame_waves(wav[None], torch.tensor([wav.shape[0]], device=wav.device))
    power, _ = kaldi_power_spectrum(frames[0], povey_window(FRAME_LENGTH).to(wav.device))
    banks = kaldi_mel_banks(num_mel_bins).to(wav.device)
    return log_mel_from_power(power, banks)


def compute_deltas(x: torch.Tensor, lengths: torch.Tensor | None = None, window: int = 2) -> torch.Tensor:
    """Regression deltas over time of ``x [B, T, D]`` (the Kaldi / torchaudio ``compute_deltas`` rule).

    ``d[t] = sum_{k=1..N} k * (x[t + k] - x[t - k]) / (2 * sum_{k=1..N} k^2)`` with ``N = window`` (2: 5 frames).
    Frames outside an utterance replicate its own first / last valid frame (``lengths[b]``, default ``T``), never
    padding. Values at padded positions are meaningless. Returns ``[B, T, D]``.
    """
    batch, total, dim = x.shape
    if lengths is None:
        lengths = torch.full((batch,), total, dtype=torch.long, device=x.device)
    last = (lengths.to(x.device).clamp(1, total) - 1)[:, None]
    # One gather builds each utterance's edge-replicated sequence [B, T + 2 N, D]; deltas are then weighted slices.
    source = torch.arange(-window, total + window, device=x.device)[None, :]
    source = torch.minimum(source.clamp_min(0), last)
    padded = x.gather(1, source[..., None].expand(batch, total + 2 * window, dim))
    denom = 2.0 * sum(k * k for k in range(1, window + 1))
    out = torch.zeros_like(x)
    for k in range(1, window + 1):  # loop over the (few) regression offsets, not over frames
        out = out + k * (padded[:, window + k : window + k + total] - padded[:, window - k : window - k + total])
    return out / denom


def add_deltas(x: torch.Tensor, lengths: torch.Tensor | None = None, window: int = 2) -> torch.Tensor:
    """Stack ``x``, its deltas and its delta-deltas (deltas of deltas): ``[B, T, D] -> [B, T, 3 D]``."""
    delta = compute_deltas(x, lengths, window)
    return torch.cat([x, delta, compute_deltas(delta, lengths, window)], dim=-1)


def masked_cmvn(x: torch.Tensor, lengths: torch.Tensor, eps: float = CMVN_EPS,
                constant_below: float = CMVN_CONSTANT_BELOW) -> torch.Tensor:
    """Per-utterance mean and variance normalisation of ``x [B, T, D]`` over its valid frames.

    ``(x - mean) / (std + eps)`` per utterance and dimension, both statistics over the first ``lengths[b]`` frames
    only, with the unbiased (``T - 1``) standard deviation and ``eps = 1e-10`` added, as s3prl's baseline CMVN
    (``x.std(dim=0)``) does. A dimension whose std is below ``constant_below`` is constant up to float round-off and
    comes out as 0 (dividing its round-off by ``eps`` would give arbitrary values); so does a one-frame utterance.
    Padded frames come out as 0.
    """
    mask = length_mask(lengths.to(x.device), x.shape[1]).to(x.dtype)[..., None]
    count = mask.sum(dim=1, keepdim=True)
    mean = (x * mask).sum(dim=1, keepdim=True) / count.clamp_min(1.0)
    centered = (x - mean) * mask
    std = (centered.square().sum(dim=1, keepdim=True) / (count - 1.0).clamp_min(1.0)).sqrt()
    scale = torch.where(std >= constant_below, 1.0 / (std + eps), torch.zeros_like(std))
    return centered * scale
