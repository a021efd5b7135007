"""APC and modified CPC: s3prl checkpoint layouts, our format, input features, frame rules, batch invariance."""

import argparse
import math

import numpy as np
import pytest
import torch
from helpers import padded_batch, speechlike, tiny_apc, tiny_cpc

from speechbench.common import sha256_file
from speechbench.upstreams.apc import APCUpstream, apc_s3prl_checkpoint
from speechbench.upstreams.checkpoints import CheckpointError, save_speechbench_checkpoint
from speechbench.upstreams.cpc import CONV_SPECS, CPCUpstream, cpc_s3prl_checkpoint
from speechbench.upstreams.registry import build_upstream

LENGTHS = [16000, 9377, 2500, 300]


def _kaldi_fbank_hamming_reference(wav: np.ndarray, num_bins: int = 80) -> np.ndarray:
    """torchaudio.compliance.kaldi.fbank(window_type="hamming") + s3prl CMVN, frame by frame in numpy."""
    wav = wav.astype(np.float64)
    n_frames = 1 + (len(wav) - 400) // 160
    window = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(400) / 399)
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    low, high = mel(20.0), mel(8000.0)
    delta = (high - low) / (num_bins + 1)
    bin_mel = mel(16000 / 512 * np.arange(256))
    banks = np.zeros((num_bins, 257))
    for m in range(num_bins):
        left, center, right = low + m * delta, low + (m + 1) * delta, low + (m + 2) * delta
        up, down = (bin_mel - left) / (center - left), (right - bin_mel) / (right - center)
        banks[m, :256] = np.where((bin_mel > left) & (bin_mel < right), np.minimum(up, down), 0.0)
    feats = np.zeros((n_frames, num_bins))
    for t in range(n_frames):
        x = wav[t * 160: t * 160 + 400].copy()
        x -= x.mean()
        x = x - 0.97 * np.concatenate([x[:1], x[:-1]])
        spectrum = np.fft.rfft(x * window, n=512)
        feats[t] = np.log(np.maximum(banks @ np.abs(spectrum) ** 2, np.finfo(np.float32).eps))
    return (feats - feats.mean(0)) / (1e-10 + feats.std(0, ddof=1))


def test_apc_features_match_s3prl_fbank_with_cmvn():
    from speechbench.upstreams.apc import apc_features

    up = APCUpstream(tiny_apc())
    wav = speechlike(4000, 5)
    feats, counts = apc_features(wav[None], torch.tensor([4000]), up.model.config, up.window, up.mel_banks)
    assert counts.tolist() == [1 + (4000 - 400) // 160]
    np.testing.assert_allclose(feats[0].numpy(), _kaldi_fbank_hamming_reference(wav.numpy()), atol=2e-3, rtol=1e-3)


def test_apc_s3prl_checkpoint_loads_and_matches_its_module(tmp_path):
    model = tiny_apc(seed=1)
    ckpt = apc_s3prl_checkpoint(model)
    assert set(ckpt["model"]) == {f"rnn_layers.{i}.{w}_{d}_l0" for i in range(3) for w in ("weight", "bias")
                                  for d in ("ih", "hh")} | {"postnet.weight", "postnet.bias"}
    # what s3prl's runner saves beside them: optimizer state, step, the argparse Namespace of the run
    ckpt.update({"Optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "Step": 123,
                 "Args": argparse.Namespace(config="config_model.yaml", seed=1337), "Upstream_Config": ckpt["config"]})
    torch.save(ckpt, tmp_path / "apc.ckpt")
    up = build_upstream("apc", ckpt=str(tmp_path / "apc.ckpt"))
    assert (up.num_layers, up.hidden_size, up.downsample_rate, up.checkpoint_format) == (3, 32, 160, "s3prl")
    ref = APCUpstream(model)
    wavs, lengths = padded_batch(LENGTHS)
    with torch.inference_mode():
        ours, expected = up(wavs, lengths), ref(wavs, lengths)
        torch.testing.assert_close(ours.hidden, expected.hidden)
        # layer outputs are the GRU stack's, residual from the second layer on, as s3prl's hooks expose them
        feats = torch.zeros(1, int(ours.lengths[0]), 80)
        from speechbench.upstreams.apc import apc_features

        feats, _ = apc_features(wavs[:1], lengths[:1], model.config, ref.window, ref.mel_banks)
        h1, _ = model.rnn_layers[0](feats)
        h2 = model.rnn_layers[1](h1)[0] + h1
        torch.testing.assert_close(ours.hidden[0, 1, : h2.shape[1]], h2[0], atol=1e-5, rtol=1e-4)


def test_cpc_s3prl_checkpoint_loads_and_matches_its_module(tmp_path):
    model = tiny_cpc(seed=2)
    ckpt = cpc_s3prl_checkpoint(model)
    ckpt["config"].update({"nPredicts": 12, "samplingType": "samespeaker", "load": None})  # extra CPC_audio args
    torch.save(ckpt, tmp_path / "cpc.pt")
    up = build_upstream(str(tmp_path / "cpc.pt"))
    assert (up.num_layers, up.hidden_size, up.downsample_rate, up.checkpoint_format) == (2, 32, 160, "s3prl")
    assert up.checkpoint_sha256 == sha256_file(tmp_path / "cpc.pt")
    wav = speechlike(16000, 4)[None]
    with torch.inference_mode():
        ours = up(wav, torch.tensor([16000]))
        # s3prl's own forward on one unpadded utterance: encoder output (transposed) and AR output
        encoded = model.gEncoder(wav[:, None])[0].transpose(1, 2)
        context = model.gAR(encoded)
    assert ours.lengths.tolist() == [100] and encoded.shape[1] == 100
    torch.testing.assert_close(ours.hidden[0, 0], encoded[0])
    torch.testing.assert_close(ours.hidden[0, 1], context[0])


def test_our_format_round_trips_for_apc_and_cpc(tmp_path):
    import dataclasses

    for family, model, cls in (("apc", tiny_apc(3), APCUpstream), ("cpc", tiny_cpc(3), CPCUpstream)):
        out = save_speechbench_checkpoint(tmp_path / family, family, dataclasses.asdict(model.config),
                                          model.state_dict())
        up = build_upstream(str(out))
        assert up.checkpoint_format == "speechbench" and up.family == family
        wavs, lengths = padded_batch([7000, 4000])
        with torch.inference_mode():
            torch.testing.assert_close(up(wavs, lengths).hidden, cls(model)(wavs, lengths).hidden)


@pytest.mark.parametrize("build", [lambda: APCUpstream(tiny_apc()), lambda: CPCUpstream(tiny_cpc())])
def test_batched_equals_one_at_a_time(build):
    up = build()
    wavs, lengths = padded_batch(LENGTHS + [100])
    with torch.inference_mode():
        batched = up(wavs, lengths)
        assert batched.hidden.shape[2] == int(batched.lengths.max())
        for b, n in enumerate(lengths.tolist()):
            alone = up(wavs[b: b + 1, :n], lengths[b: b + 1])
            k = int(batched.lengths[b])
            assert int(alone.lengths[0]) == k
            torch.testing.assert_close(batched.hidden[b, :, :k], alone.hidden[0], atol=1e-5, rtol=1e-4)
            assert batched.hidden[b, :, k:].abs().max() == 0 if k < batched.hidden.shape[2] else True


def test_frame_rules():
    apc, cpc = APCUpstream(tiny_apc()), CPCUpstream(tiny_cpc())
    samples = torch.tensor([100, 400, 559, 560, 16000, 16159, 480000])
    assert apc.frame_lengths(samples).tolist() == [1, 1, 1, 2, 98, 99, 2998]
    expected = []
    for s in samples.tolist():
        n = max(s, 160)
        for k, st, p in CONV_SPECS:
            n = math.floor((n + 2 * p - k) / st) + 1
        expected.append(n)
    assert cpc.frame_lengths(samples).tolist() == expected and expected[4] == 100


def test_unsupported_variants_are_refused(tmp_path):
    ckpt = apc_s3prl_checkpoint(tiny_apc())
    ckpt["config"]["model"]["paras"]["vq"] = {"codebook_size": [64], "code_dim": [32]}
    torch.save(ckpt, tmp_path / "vq.ckpt")
    with pytest.raises(CheckpointError, match="VQ-APC"):
        build_upstream(str(tmp_path / "vq.ckpt"))
    ckpt = cpc_s3prl_checkpoint(tiny_cpc())
    ckpt["config"]["normMode"] = "instanceNorm"
    torch.save(ckpt, tmp_path / "cpc.pt")
    with pytest.raises(CheckpointError, match="instanceNorm"):
        build_upstream(str(tmp_path / "cpc.pt"))
    ckpt = cpc_s3prl_checkpoint(tiny_cpc())
    del ckpt["weights"]["gAR.baseNet.weight_hh_l1"]
    torch.save(ckpt, tmp_path / "cpc2.pt")
    with pytest.raises(CheckpointError, match=r"cpc2.pt: weights do not match"):
        build_upstream(str(tmp_path / "cpc2.pt"))
