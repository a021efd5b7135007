"""The feature cache: exact contents, keys that track their inputs, damaged shards rebuilt."""

import dataclasses

import numpy as np
import pytest
import soundfile as sf
import torch

import speechbench.benchmark.cache as cache_mod
from speechbench.benchmark.cache import FeatureCache, estimate_frames_bytes, feature_key, upstream_identity
from speechbench.benchmark.features import run_upstream
from speechbench.downstreams.data import Utterance
from speechbench.downstreams.heads import masked_mean
from speechbench.upstreams.base import UpstreamOutput


class HopStats(torch.nn.Module):
    """A tiny deterministic upstream: per 160-sample hop, [mean, std, max, min] and their squares (L=2, D=4)."""

    name, sample_rate, num_layers, hidden_size, downsample_rate = "hopstats", 16000, 2, 4, 160

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, wavs, wav_lengths):
        self.calls += 1
        t = wavs.shape[1] // 160
        hops = wavs[:, : t * 160].reshape(wavs.shape[0], t, 160)
        first = torch.stack([hops.mean(-1), hops.std(-1), hops.amax(-1), hops.amin(-1)], dim=-1)
        lengths = wav_lengths // 160
        mask = (torch.arange(t)[None] < lengths[:, None])[..., None]
        hidden = torch.stack([first, first**2], dim=1) * mask[:, None]
        return UpstreamOutput(hidden, lengths)


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    utts = []
    for i, seconds in enumerate([0.5, 1.2, 0.8, 2.0, 0.3]):
        path = tmp_path / "wavs" / f"u{i}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
        utts.append(Utterance(f"u{i}", f"wavs/u{i}.wav", seconds, "s", "train"))
    return tmp_path, utts


def _build(up, utts, root, granularity, cache_dir, name="hopstats"):
    return FeatureCache.open_or_build(up, upstream_identity(up, name), utts, root, "train", granularity,
                                      max_batch_s=2.5, root=cache_dir)


def test_pooled_cache_equals_direct_masked_means(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "SHARD_UTTERANCES", 2)  # several shards, one partial
    root, utts = corpus
    up = HopStats()
    pooled = _build(up, utts, root, "pooled", tmp_path / "c").load_pooled()
    assert pooled.shape == (5, 2, 4)
    for i, u in enumerate(utts):
        hidden, lengths = run_upstream(up, [u], root)
        direct = torch.stack([masked_mean(hidden[:, layer], lengths)[0] for layer in range(2)])
        assert torch.allclose(pooled[i], direct, atol=1e-6)


def test_frames_cache_matches_upstream_and_crops(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "SHARD_UTTERANCES", 2)
    root, utts = corpus
    up = HopStats()
    frames = _build(up, utts, root, "frames", tmp_path / "c").frames(100.0)
    assert len(frames) == 5 and frames.durations_s == pytest.approx([u.duration_s for u in utts])
    hidden, lengths = frames.get([3, 0])
    assert hidden.shape == (2, 2, 200, 4) and lengths.tolist() == [200, 50]
    direct, direct_lengths = run_upstream(up, [utts[3], utts[0]], root)
    assert torch.allclose(hidden, direct, atol=2e-3, rtol=2e-3)  # float16 storage
    cropped = frames.with_crop(60, seed=1)
    a, a_len = cropped.get([3, 0], draw=7)
    b, _ = cropped.get([3, 0], draw=7)
    assert a_len.tolist() == [60, 50] and torch.equal(a, b)  # same draw, same crop
    assert not torch.equal(a, cropped.get([3, 0], draw=8)[0])


def test_cache_hit_skips_the_upstream(corpus, tmp_path):
    root, utts = corpus
    up = HopStats()
    _build(up, utts, root, "pooled", tmp_path / "c")
    calls = up.calls
    _build(up, utts, root, "pooled", tmp_path / "c")
    assert calls > 0 and up.calls == calls


def test_truncated_shard_is_rebuilt(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "SHARD_UTTERANCES", 2)
    root, utts = corpus
    up = HopStats()
    first = _build(up, utts, root, "pooled", tmp_path / "c")
    reference = first.load_pooled()
    shard = first.shards[1]
    shard.write_bytes(shard.read_bytes()[:40])  # an interrupted write
    calls = up.calls
    again = _build(up, utts, root, "pooled", tmp_path / "c")
    assert up.calls > calls  # the damaged shard was recomputed...
    assert torch.equal(again.load_pooled(), reference)  # ...to the same values
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: caught by the checksum
    shard.write_bytes(bytes(data))
    calls = up.calls
    _build(up, utts, root, "pooled", tmp_path / "c")
    assert up.calls > calls


def test_key_tracks_manifest_checkpoint_and_granularity(corpus):
    root, utts = corpus
    up = HopStats()
    ident = upstream_identity(up, "hopstats")
    key = feature_key(ident, utts, root, "train", "pooled")
    assert key == feature_key(ident, list(utts), root, "train", "pooled")
    changed_row = [dataclasses.replace(utts[0], duration_s=0.6)] + utts[1:]
    assert feature_key(ident, changed_row, root, "train", "pooled") != key
    up.checkpoint_sha256 = "beef"
    assert feature_key(upstream_identity(up, "hopstats"), utts, root, "train", "pooled") != key
    assert feature_key(ident, utts, root, "train", "frames") != key
    assert feature_key(ident, utts, root, "dev", "pooled") != key


def test_frames_size_estimate(corpus):
    _, utts = corpus
    # 100 frames per second (+1 per utterance) x L=2 x D=4 x 2 bytes
    assert estimate_frames_bytes(utts, HopStats()) == (50 + 120 + 80 + 200 + 30 + 5) * 2 * 4 * 2
