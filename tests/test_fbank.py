"""Weight-free Kaldi feature upstreams: fbank, fbank_no_cmvn and mfcc (upstreams/fbank.py, upstreams/features.py)."""

import numpy as np
import pytest
import torch
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from speechbench.upstreams.base import Upstream
from speechbench.upstreams.features import add_deltas, compute_deltas, kaldi_log_mel, masked_cmvn
from speechbench.upstreams.registry import build_upstream, get_upstream_entry

SR = 16000
EPS = float(np.finfo(np.float32).eps)
NAMES = ["fbank", "fbank_no_cmvn", "mfcc"]
DIMS = {"fbank": 240, "fbank_no_cmvn": 240, "mfcc": 39}


def synthetic_wave(num_samples: int, seed: int = 0) -> np.ndarray:
    """A chirp (50 Hz -> 7 kHz) with an amplitude envelope plus white noise, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / SR
    duration = num_samples / SR
    phase = 2 * np.pi * (50 * t + (7000 - 50) / (2 * duration) * t**2)
    envelope = 0.3 + 0.25 * np.sin(2 * np.pi * 3 * t + seed)
    return (envelope * np.sin(phase) + 0.02 * rng.standard_normal(num_samples)).astype(np.float32)


def reference_log_mel(wav: np.ndarray, num_mel_bins: int) -> np.ndarray:
    """Independent Kaldi log-mel via transformers.audio_utils (float64 numpy): [T, num_mel_bins]."""
    banks = mel_filter_bank(
        num_frequency_bins=257,
        num_mel_filters=num_mel_bins,
        min_frequency=20.0,
        max_frequency=SR / 2,
        sampling_rate=SR,
        mel_scale="kaldi",
        triangularize_in_mel_space=True,
    )
    spec = spectrogram(
        wav,
        window_function(400, "povey", periodic=False),
        frame_length=400,
        hop_length=160,
        fft_length=512,
        power=2.0,
        center=False,
        preemphasis=0.97,
        mel_filters=banks,
        mel_floor=EPS,
        log_mel="log",
        remove_dc_offset=True,
    )
    return spec.T


def run(upstream: Upstream, wavs: list[np.ndarray], pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a list of waves into a batch (padding filled with pad_value) and run the upstream."""
    lengths = torch.tensor([len(w) for w in wavs])
    batch = torch.full((len(wavs), int(lengths.max())), pad_value)
    for i, w in enumerate(wavs):
        batch[i, : len(w)] = torch.from_numpy(w)
    with torch.inference_mode():
        out = upstream(batch, lengths)
    return out.hidden, out.lengths


@pytest.fixture(scope="module")
def upstreams() -> dict[str, Upstream]:
    return {name: build_upstream(name) for name in NAMES}


@pytest.mark.parametrize("num_samples", [16000, 16000 + 123, 3 * 16000 + 7])
def test_log_mel_matches_transformers_reference(num_samples):
    wav = synthetic_wave(num_samples)
    ref = reference_log_mel(wav, 80)
    ours = kaldi_log_mel(torch.from_numpy(wav)).double().numpy()
    assert ours.shape == ref.shape == (1 + (num_samples - 400) // 160, 80)
    # Ours runs in float32 (as Kaldi and torchaudio do), the reference in float64: the FFT's float32 round-off is
    # relative to the frame's energy, so bins 60+ dB below a frame's strongest bin differ by up to a few 1e-3.
    diff = np.abs(ours - ref)
    strong = ref >= ref.max(axis=1, keepdims=True) - 14.0  # within 14 nepers (~61 dB) of the frame's peak
    assert strong.mean() > 0.8
    assert diff[strong].max() < 2e-4
    assert diff.max() < 1e-2
    assert np.median(diff) < 1e-5


def kaldi_reference(wav: np.ndarray, kind: str, num_mel_bins: int, cmvn: bool, num_ceps: int = 13) -> np.ndarray:
    """torchaudio.compliance.kaldi's fbank/mfcc formulas with their defaults (dither 0, povey window, snip_edges,
    pre-emphasis 0.97, DC removal, n_fft 512, low_freq 20, log floor float eps, mfcc use_energy=False, lifter 22),
    then s3prl's baseline ComputeDeltas(win_length=5) twice and CMVN ``(x - mean) / (1e-10 + std)`` with the
    unbiased std, written out independently of the code under test in float64 numpy, loops where that is clearer.
    Returns ``[T, 3 * (num_mel_bins or num_ceps)]``."""
    x = wav.astype(np.float64)
    frames = np.stack([x[t * 160: t * 160 + 400] for t in range(1 + (len(x) - 400) // 160)])
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85
    power = np.abs(np.fft.rfft(frames * window, n=512)) ** 2  # [T, 257]

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    low, high = mel(20.0), mel(SR / 2)
    step = (high - low) / (num_mel_bins + 1)
    fft_mel = mel(np.arange(256) * SR / 512)
    banks = np.zeros((num_mel_bins, 257))  # the Nyquist bin gets no weight
    for m in range(num_mel_bins):
        left, centre, right = low + m * step, low + (m + 1) * step, low + (m + 2) * step
        for k in range(256):
            banks[m, k] = max(0.0, min((fft_mel[k] - left) / (centre - left), (right - fft_mel[k]) / (right - centre)))
    feats = np.log(np.maximum(power @ banks.T, EPS))
    if kind == "mfcc":
        dct = np.array([[np.cos(np.pi / num_mel_bins * (j + 0.5) * k) * np.sqrt(2 / num_mel_bins)
                         for j in range(num_mel_bins)] for k in range(num_ceps)])
        dct[0] = np.sqrt(1 / num_mel_bins)  # c0: the plain (scaled) sum of the log-mel energies
        feats = (feats @ dct.T) * (1 + 11 * np.sin(np.pi * np.arange(num_ceps) / 22))

    def deltas(a):
        padded = np.concatenate([a[:1], a[:1], a, a[-1:], a[-1:]])
        return np.stack([(padded[t + 3] - padded[t + 1] + 2 * (padded[t + 4] - padded[t])) / 10
                         for t in range(len(a))])

    d1 = deltas(feats)
    out = np.concatenate([feats, d1, deltas(d1)], axis=1)
    return (out - out.mean(axis=0)) / (1e-10 + out.std(axis=0, ddof=1)) if cmvn else out


def speech_like_wave(num_samples: int) -> np.ndarray:
    """The chirp under noise strong enough that no mel bin sits 60+ dB below its frame's peak: float32 FFT
    round-off then stays far below 1e-4 of scale, so the comparison checks the formulas, not the arithmetic."""
    noise = 0.3 * np.random.default_rng(5).standard_normal(num_samples)
    return (synthetic_wave(num_samples, seed=1) + noise).astype(np.float32)


@pytest.mark.parametrize("name,kind,bins,cmvn", [("fbank", "fbank", 80, True), ("fbank_no_cmvn", "fbank", 80, False),
                                                 ("mfcc", "mfcc", 23, True)])
@pytest.mark.parametrize("num_samples", [11200, 16000 + 123, 3 * 16000 + 7])  # 11200: the 0.7 s clip of issue 13
def test_features_match_an_independent_kaldi_reimplementation(upstreams, name, kind, bins, cmvn, num_samples):
    """Within 1e-4 of scale on every valid frame (mfcc: c0 is the cepstral c0, not the log energy)."""
    wav = speech_like_wave(num_samples)
    ref = kaldi_reference(wav, kind, bins, cmvn)
    hidden, lengths = run(upstreams[name], [wav])
    ours = hidden[0, 0].double().numpy()
    assert ours.shape == ref.shape and int(lengths[0]) == len(ref)
    assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max()


def test_reference_tells_the_old_mfcc_c0_and_cmvn_apart():
    """The comparison above is sharp enough to see both fixes: Kaldi-binary c0 (log energy) and population std."""
    wav = speech_like_wave(11200)
    ref = kaldi_reference(wav, "mfcc", 23, cmvn=False)
    frames = np.stack([wav[t * 160: t * 160 + 400].astype(np.float64) for t in range(len(ref))])
    log_energy = np.log(((frames - frames.mean(axis=1, keepdims=True)) ** 2).sum(axis=1))
    assert np.abs(ref[:, 0] - log_energy).max() > 1.0
    fb = kaldi_reference(wav, "fbank", 80, cmvn=False)
    unbiased = (fb - fb.mean(0)) / fb.std(0, ddof=1)
    population = (fb - fb.mean(0)) / fb.std(0)
    assert np.abs(unbiased - population).max() > 50 * 1e-4 * np.abs(unbiased).max()


@pytest.mark.parametrize("name", NAMES)
def test_declared_attributes_and_shapes(upstreams, name):
    up = upstreams[name]
    assert isinstance(up, Upstream)
    assert (up.name, up.sample_rate, up.num_layers, up.downsample_rate) == (name, 16000, 1, 160)
    assert up.hidden_size == DIMS[name]
    assert not up.training and not any(p.requires_grad for p in up.parameters())
    assert not get_upstream_entry(name).needs_weights
    for num_samples in [400, 559, 560, 16000, 16000 + 123]:
        hidden, lengths = run(up, [synthetic_wave(num_samples)])
        frames = 1 + (num_samples - 400) // 160
        assert hidden.shape == (1, 1, frames, DIMS[name]) and hidden.dtype == torch.float32
        assert lengths.tolist() == [frames] and lengths.dtype == torch.int64
    hidden, lengths = run(up, [synthetic_wave(250)])  # shorter than one frame: zero-padded to one frame
    assert hidden.shape == (1, 1, 1, DIMS[name]) and lengths.tolist() == [1]
    assert torch.isfinite(hidden).all()


def test_summaries_explain_the_fbank_floor():
    for name in ["fbank", "mfcc"]:
        summary = get_upstream_entry(name).summary
        assert "CMVN" in summary and "one class's share" in summary and "fbank_no_cmvn" in summary
        assert len(summary.strip().splitlines()) <= 3
    assert "8.63" in get_upstream_entry("fbank").summary


@pytest.mark.parametrize("name", NAMES)
def test_cmvn_statistics(upstreams, name):
    hidden, lengths = run(upstreams[name], [synthetic_wave(2 * 16000, seed=1)])
    x = hidden[0, 0, : int(lengths[0])]
    mean, std = x.mean(dim=0), x.std(dim=0)  # unbiased, as s3prl's CMVN
    if name == "fbank_no_cmvn":
        assert mean[:80].abs().max() > 1.0 and (std - 1).abs().max() > 0.1
    else:
        assert mean.abs().max() < 1e-4
        assert torch.allclose(std, torch.ones_like(std), atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_one_at_a_time(upstreams, name):
    up = upstreams[name]
    wavs = [synthetic_wave(n, seed=i) for i, n in enumerate([16000 + 321, 9000, 300])]
    hidden, lengths = run(up, wavs, pad_value=0.7)  # non-zero padding must not leak into valid frames
    assert lengths.tolist() == [1 + (16000 + 321 - 400) // 160, 1 + (9000 - 400) // 160, 1]
    assert hidden.shape[2] == int(lengths.max())
    for i, wav in enumerate(wavs):
        alone, alone_len = run(up, [wav])
        n = int(lengths[i])
        assert int(alone_len[0]) == n
        torch.testing.assert_close(hidden[i, :, :n], alone[0], atol=1e-4, rtol=0)
        assert torch.all(hidden[i, :, n:] == 0)


def test_batch_with_extra_trailing_padding_is_trimmed(upstreams):
    wav = synthetic_wave(8000)
    batch = torch.zeros(2, 20000)
    batch[0, :8000] = torch.from_numpy(wav)
    batch[1, :8000] = torch.from_numpy(wav)
    with torch.inference_mode():
        out = upstreams["fbank"](batch, torch.tensor([8000, 8000]))
    assert out.hidden.shape[2] == 1 + (8000 - 400) // 160
    torch.testing.assert_close(out.hidden[0], out.hidden[1])


def test_bad_lengths_are_refused(upstreams):
    with pytest.raises(ValueError, match="wav_lengths"):
        upstreams["fbank"](torch.zeros(2, 1000), torch.tensor([1000, 1001]))
    with pytest.raises(ValueError, match="wavs must be"):
        upstreams["fbank"](torch.zeros(1000), torch.tensor([1000]))


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="takes no options"):
        build_upstream("fbank", layer=3)


def test_deltas_of_a_linear_ramp():
    slope = torch.tensor([0.5, -2.0, 3.0])
    x = (torch.arange(20, dtype=torch.float32)[:, None] * slope)[None]  # [1, 20, 3]
    d = compute_deltas(x)
    torch.testing.assert_close(d[0, 2:-2], slope.expand(16, 3))
    # edges replicate the first / last frame: (1 * a + 2 * 2a) / 10 = 0.5 a; one frame in: (2a + 2 * 3a) / 10
    torch.testing.assert_close(d[0, 0], 0.5 * slope)
    torch.testing.assert_close(d[0, 1], 0.8 * slope)
    torch.testing.assert_close(d[0, -1], 0.5 * slope)
    dd = compute_deltas(d)
    torch.testing.assert_close(dd[0, 4:-4], torch.zeros(12, 3))


def test_deltas_replicate_each_utterance_own_last_frame():
    slope = torch.tensor([1.0, -1.0])
    ramp = torch.arange(12, dtype=torch.float32)[:, None] * slope
    batch = torch.stack([ramp, ramp])
    batch[1, 7:] = 100.0  # padding after 7 valid frames
    d = compute_deltas(batch, torch.tensor([12, 7]))
    torch.testing.assert_close(d[1, :7], compute_deltas(ramp[None, :7])[0])
    torch.testing.assert_close(d[1, 6], 0.5 * slope)
    full = add_deltas(batch, torch.tensor([12, 7]))
    assert full.shape == (2, 12, 6)


def test_masked_cmvn_ignores_padding():
    x = torch.randn(2, 10, 4)
    x[1, 6:] = 50.0
    y = masked_cmvn(x, torch.tensor([10, 6]))
    torch.testing.assert_close(y[1, :6], masked_cmvn(x[1:, :6], torch.tensor([6]))[0])
    assert torch.all(y[1, 6:] == 0)
    const = masked_cmvn(torch.full((1, 5, 3), 0.1), torch.tensor([5]))  # zero variance (up to round-off): 0, no NaN
    assert torch.all(const == 0)
    assert torch.all(masked_cmvn(torch.randn(1, 1, 3), torch.tensor([1])) == 0)  # one frame: no NaN either


def test_fbank_pooled_input_is_identical_for_every_clip(upstreams):
    """Why FBANK scores one class's test share: per-clip masked time-means are all zero after CMVN."""
    wavs = [synthetic_wave(n, seed=i) for i, n in enumerate([16000, 12000, 7000, 16000])]
    wavs[3] = 0.01 * wavs[3][::-1].copy()  # very different loudness and content

    def pooled(name: str) -> torch.Tensor:
        hidden, lengths = run(upstreams[name], wavs)
        mask = (torch.arange(hidden.shape[2])[None, :] < lengths[:, None]).float()[:, None, :, None]
        return ((hidden * mask).sum(dim=2) / mask.sum(dim=2))[:, 0]  # [B, D]

    fbank_means = pooled("fbank")
    assert fbank_means.abs().max() < 1e-4
    head = torch.nn.Linear(240, 8)  # linear -> mean over time == mean over time -> linear: same for every clip
    outputs = head(fbank_means)
    assert torch.allclose(outputs, outputs[:1].expand_as(outputs), atol=1e-4)
    raw_means = pooled("fbank_no_cmvn")
    assert (raw_means[0] - raw_means[3]).abs().max() > 1.0  # without CMVN the clips stay distinguishable
