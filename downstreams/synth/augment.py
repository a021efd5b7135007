"""Signal processing that turns espeak's clean output into less trivially synthetic audio.

Order per utterance (``render.py`` drives it): vocal-tract warp + resample to 16 kHz, trim, spectral tilt, breath
noise (ER only), optional reverb, active-speech level normalisation, random gain, coloured noise at a random SNR,
peak guard.
Every function takes its randomness from the caller's ``numpy.random.Generator``.
"""

from __future__ import annotations

from functools import lru_cache
from math import gcd

import numpy as np
from scipy.fft import irfft, next_fast_len, rfft
from scipy.signal import fftconvolve, firwin, lfilter, resample_poly

from speechbench.common import SAMPLE_RATE

TARGET_DBFS = -28.0  # active-speech RMS before the random gain; leaves >=16 dB of headroom for peaks
_FRAME = 320  # 20 ms at 16 kHz


def db_to_amp(db: float) -> float:
    return float(10.0 ** (db / 20.0))


@lru_cache(maxsize=256)
def _lowpass(up: int, down: int) -> np.ndarray:
    # resample_poly would redesign this long filter on every call; the (up, down) pairs repeat, so cache it
    max_rate = max(up, down)
    return firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0))


def warp_resample(pcm: np.ndarray, native_rate: int, warp: float) -> np.ndarray:
    """int16 samples at ``native_rate`` -> float32 at 16 kHz, played ``warp`` times faster.

    Treating the samples as if they had been recorded at ``native_rate * warp`` scales every frequency (formants
    and pitch) by ``warp`` and durations by ``1/warp``: a cheap vocal-tract-length change. The source rate is
    rounded to a multiple of 50 Hz to keep the polyphase ratio small.
    """
    src = int(round(native_rate * warp / 50.0)) * 50
    g = gcd(SAMPLE_RATE, src)
    up, down = SAMPLE_RATE // g, src // g
    x = pcm.astype(np.float64) / 32768.0
    return resample_poly(x, up, down, window=_lowpass(up, down)).astype(np.float32)


def speech_bounds(x: np.ndarray, rel_db: float = -45.0) -> tuple[int, int]:
    """First and one-past-last sample of the region whose 20 ms frames rise above ``rel_db`` of the loudest."""
    n = len(x) // _FRAME
    if n == 0:
        return 0, len(x)
    rms = np.sqrt(np.mean(x[: n * _FRAME].reshape(n, _FRAME).astype(np.float64) ** 2, axis=1) + 1e-20)
    active = np.nonzero(rms > rms.max() * db_to_amp(rel_db))[0]
    if len(active) == 0:
        return 0, len(x)
    return int(active[0] * _FRAME), int(min(len(x), (active[-1] + 1) * _FRAME))


def trim(x: np.ndarray, rng: np.random.Generator, margin_s: tuple[float, float] = (0.05, 0.25)) -> np.ndarray:
    """Cut espeak's leading/trailing silence and put back a random margin on each side (zeros, later noise)."""
    a, b = speech_bounds(x)
    lead, tail = (int(rng.uniform(*margin_s) * SAMPLE_RATE) for _ in range(2))
    return np.concatenate([np.zeros(lead, np.float32), x[a:b], np.zeros(tail, np.float32)])


def tilt(x: np.ndarray, gain: float) -> np.ndarray:
    """Spectral tilt: add ``gain`` times the part of the signal above ~1 kHz (gain<0 darkens, >0 brightens)."""
    a = np.exp(-2 * np.pi * 1000.0 / SAMPLE_RATE)
    low = lfilter([1 - a], [1, -a], x)
    return (x + gain * (x - low)).astype(np.float32)


def breath(x: np.ndarray, level_db: float, rng: np.random.Generator) -> np.ndarray:
    """Breathy voice: add aspiration noise (white noise above ~1.5 kHz, following the speech's own 10 ms envelope)
    at ``level_db`` relative to the speech."""
    a = np.exp(-1.0 / (0.010 * SAMPLE_RATE))
    envelope = lfilter([1 - a], [1, -a], np.abs(x.astype(np.float64)))
    noise = rng.standard_normal(len(x))
    b = np.exp(-2 * np.pi * 1500.0 / SAMPLE_RATE)
    aspiration = (noise - lfilter([1 - b], [1, -b], noise)) * envelope
    scale = np.sqrt(np.mean(x.astype(np.float64) ** 2) / (np.mean(aspiration ** 2) + 1e-20)) * db_to_amp(level_db)
    return (x + scale * aspiration).astype(np.float32)


def reverb(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Convolve with a synthetic room: direct path plus exponentially decaying noise (RT60 0.15-0.6 s)."""
    rt60 = rng.uniform(0.15, 0.6)
    n = int(min(rt60, 0.5) * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    tail[: int(0.002 * SAMPLE_RATE)] = 0.0  # first reflections arrive a few ms after the direct sound
    ir = tail / np.sqrt(np.sum(tail ** 2) + 1e-12) * rng.uniform(0.3, 0.9)  # direct-to-reverberant ratio
    ir[0] = 1.0
    return fftconvolve(x, ir)[: len(x)].astype(np.float32)


def active_rms(x: np.ndarray, rel_db: float = -35.0) -> float:
    """RMS over the 20 ms frames within ``rel_db`` of the loudest frame: the level of the speech itself, not of
    the pauses (so slow or pause-rich speech is not quieter after normalisation)."""
    n = len(x) // _FRAME
    if n == 0:
        return float(np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-20))
    frames = x[: n * _FRAME].astype(np.float64).reshape(n, _FRAME)
    energy = np.mean(frames ** 2, axis=1)
    keep = energy >= energy.max() * db_to_amp(rel_db) ** 2
    return float(np.sqrt(np.mean(energy[keep]) + 1e-20))


def normalise(x: np.ndarray, level_dbfs: float) -> np.ndarray:
    return (x * (db_to_amp(level_dbfs) / active_rms(x))).astype(np.float32)


def coloured_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise whose power spectrum falls as 1/f^beta, beta in [0, 2]: a random mix between white (0),
    pink (1) and brown (2) noise."""
    beta = rng.uniform(0.0, 2.0)
    m = next_fast_len(n)
    spec = rfft(rng.standard_normal(m, dtype=np.float32))
    f = np.maximum(np.fft.rfftfreq(m, 1.0 / SAMPLE_RATE).astype(np.float32), 20.0)  # floor: brown noise's DC
    noise = irfft(spec * f ** np.float32(-beta / 2.0), m)[:n].astype(np.float64)
    return (noise / (np.sqrt(np.mean(noise ** 2)) + 1e-20)).astype(np.float32)


def add_noise(x: np.ndarray, speech_rms: float, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    return (x + coloured_noise(len(x), rng) * (speech_rms * db_to_amp(-snr_db))).astype(np.float32)


def peak_guard(x: np.ndarray, limit: float = 0.98) -> np.ndarray:
    """Scale the whole clip down if it would clip in 16-bit PCM (rare at the target level)."""
    peak = float(np.max(np.abs(x))) if len(x) else 0.0
    return (x * (limit / peak)).astype(np.float32) if peak > limit else x
