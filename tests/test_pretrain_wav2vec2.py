"""wav2vec 2.0 pretraining: span masks, negatives, Gumbel schedule, loss normalisation, learning, export/load."""

import dataclasses
import json
import math

import pytest
import torch
from helpers import train_on_fixed_batch
from transformers import Wav2Vec2Model

from speechbench.upstreams.hf import HF_NORM_EPS, normalize_waveforms
from speechbench.upstreams.pretrain.base import OBJECTIVES
from speechbench.upstreams.pretrain.wav2vec2 import (
    Wav2Vec2ModelOptions,
    Wav2Vec2ObjectiveOptions,
    build,
    contrastive_logits,
    gumbel_temperature,
    sample_negatives,
    sample_span_starts,
    span_mask,
    spans_from_starts,
)
from speechbench.upstreams.registry import build_upstream

# a very small model for the fast mechanics tests (the default bundled size is used for learning and export)
MICRO = Wav2Vec2ModelOptions(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             conv_dim=(8,) * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
                             codevector_dim=8, proj_codevector_dim=8, num_codevectors_per_group=8)
SHORT = Wav2Vec2ObjectiveOptions(mask_time_length=3, num_negatives=5)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def speech_like(batch: int, num_samples: int, seed: int) -> torch.Tensor:
    """``[B, S]`` seeded harmonic 'voiced' audio: gliding pitch, syllable-rate vowels (formant-weighted harmonics,
    switching every 120 ms), a syllable envelope, noise and random loudness."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples) / 16000.0
    out = []
    for _ in range(batch):
        glide = 30 * torch.sin(2 * math.pi * (0.5 + torch.rand(1, generator=g)) * t)
        f0 = 100 + 120 * torch.rand(1, generator=g) + glide
        phase = 2 * math.pi * torch.cumsum(f0, 0) / 16000.0
        segment = (t / 0.12).long()
        formants = 300 + 2200 * torch.rand(int(segment.max()) + 1, 2, generator=g)  # [segments, 2] Hz
        wav = torch.zeros(num_samples)
        for k in range(1, 16):
            freq = k * f0
            weight = sum(torch.exp(-((freq - formants[segment, j]) / 250.0) ** 2) for j in range(2)) + 0.05
            wav += weight * torch.sin(k * phase) / k
        envelope = 0.6 + 0.4 * torch.sin(2 * math.pi * 4.0 * t + 6.0 * torch.rand(1, generator=g))
        wav = wav * envelope + 0.05 * torch.randn(num_samples, generator=g)
        out.append(wav / wav.abs().max() * (0.1 + 0.8 * torch.rand(1, generator=g)))
    return torch.stack(out)


def _runs(row: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a bool vector."""
    runs, n = [], 0
    for v in row.tolist() + [False]:
        if v:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_span_mask_fraction_runs_and_minimum():
    p, span, frames, batch = 0.65, 10, 1000, 200
    g = torch.Generator().manual_seed(0)
    mask = span_mask(batch, frames, p, span, min_spans=2, generator=g)
    assert mask.shape == (batch, frames) and mask.dtype == torch.bool
    # p * T / M = 65 starts exactly (+ U[0, 1) floors to 65), distinct among N = T - M + 1 positions; frame t is left
    # unmasked when none of the c_t starts that cover it is chosen: hypergeometric prod_i (N - c_t - i) / (N - i)
    n, positions = 65, frames - span + 1
    expected = 0.0
    for t in range(frames):
        c = min(t, positions - 1) - max(0, t - span + 1) + 1
        expected += 1.0 - math.prod((positions - c - i) / (positions - i) for i in range(n))
    expected /= frames
    assert abs(expected - (1 - (1 - p / span) ** span)) < 0.01  # the usual closed form, edges aside (~0.489)
    assert abs(mask.float().mean().item() - expected) < 0.005
    assert min(r for row in mask for r in _runs(row)) >= span  # unions of whole spans
    # counts: int(p T / M + U) starts, never fewer than min_spans
    g = torch.Generator().manual_seed(1)
    starts = sample_span_starts(500, 99, 0.65, 10, min_spans=2, generator=g)
    assert set(starts.sum(1).tolist()) == {6, 7}  # 6.435 + U[0, 1): 7 with probability 0.435
    assert abs((starts.sum(1) == 7).float().mean().item() - 0.435) < 0.07
    assert not starts[:, 99 - 10 + 1:].any()  # every span fits
    few = sample_span_starts(300, 99, 0.0, 10, min_spans=2, generator=g)
    assert (few.sum(1) == 2).all()
    assert all(10 < r.sum() <= 20 for r in spans_from_starts(few, 10))  # two distinct, maybe overlapping spans
    # reproducible from the generator's seed
    a = span_mask(4, 99, 0.65, 10, generator=torch.Generator().manual_seed(5))
    b = span_mask(4, 99, 0.65, 10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_negatives_are_other_masked_frames_of_the_same_utterance():
    g = torch.Generator().manual_seed(0)
    mask = span_mask(3, 60, 0.5, 4, generator=g)
    neg = sample_negatives(mask, 400, generator=g)
    assert neg.shape == (3, 60, 400) and neg.dtype == torch.long
    for b in range(3):
        masked = set(torch.nonzero(mask[b]).flatten().tolist())
        for t in range(60):
            frames = neg[b, t] - b * 60
            if t in masked:
                drawn = set(frames.tolist())
                assert drawn <= masked - {t}
                assert len(drawn) == len(masked) - 1  # 400 draws cover all the others (uniform, not truncated)
            else:
                assert (frames == t).all()


def test_gumbel_temperature_decays_per_training_update_and_resumes():
    assert gumbel_temperature(0, 2.0, 0.5, 0.9) == 2.0
    assert gumbel_temperature(5, 2.0, 0.5, 0.9) == pytest.approx(2.0 * 0.9**5)
    assert gumbel_temperature(14, 2.0, 0.5, 0.9) == 0.5  # 2 * 0.9**14 = 0.457 < floor
    opts = Wav2Vec2ObjectiveOptions(mask_time_length=3, num_negatives=5, gumbel_temperature_start=2.0,
                                    gumbel_temperature_end=0.5, gumbel_temperature_decay=0.9)
    obj = build(MICRO, opts, seed=0).train()
    wavs = speech_like(2, 8000, seed=0)
    lengths = torch.full((2,), 8000)
    used = []
    for _ in range(16):
        used.append(obj(wavs, lengths).stats["gumbel_temperature"])
        assert obj.model.quantizer.temperature == used[-1]  # what the quantiser's gumbel_softmax got
    assert used == pytest.approx([max(0.5, 2.0 * 0.9**n) for n in range(16)])
    assert used[-1] == 0.5 and int(obj.gumbel_updates) == 16
    obj.eval()
    obj(wavs, lengths)  # evaluation does not advance the schedule
    assert int(obj.gumbel_updates) == 16
    resumed = build(MICRO, opts, seed=1)
    resumed.load_state_dict(obj.state_dict())
    assert resumed.gumbel_temperature == 0.5 and int(resumed.gumbel_updates) == 16


def test_loss_is_per_masked_frame_and_matches_our_logits():
    obj = build(MICRO, SHORT, seed=0).train()
    wavs = normalize_waveforms(speech_like(3, 8000, seed=1), torch.full((3,), 8000), HF_NORM_EPS)
    frames = obj.num_frames(8000)
    g = torch.Generator().manual_seed(0)
    mask = span_mask(3, frames, 0.65, 3, generator=g)
    neg = sample_negatives(mask, 5, generator=g)
    out = obj.model(wavs, mask_time_indices=mask, sampled_negative_indices=neg)
    logits = contrastive_logits(out.projected_states, out.projected_quantized_states, mask, neg) / 0.1
    ours = torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long), reduction="sum")
    assert ours.item() == pytest.approx(out.contrastive_loss.item(), rel=1e-5)  # HF sums over masked frames
    gv = 2 * 8
    masked = int(mask.sum())
    assert out.diversity_loss.item() == pytest.approx((gv - out.codevector_perplexity.item()) / gv * masked, rel=1e-5)
    # the objective divides by the masked frames: the same batch twice keeps the loss scale
    torch.manual_seed(3)
    one = obj(wavs[:1].repeat(2, 1), torch.full((2,), 8000))
    torch.manual_seed(3)
    many = obj(wavs[:1].repeat(8, 1), torch.full((8,), 8000))
    for out in (one, many):
        s = out.stats
        assert out.loss.item() == pytest.approx(s["contrastive_loss"] + 0.1 * s["diversity_loss"], rel=1e-5)
        assert 0.0 <= s["accuracy"] <= 1.0 and 1.0 <= s["code_perplexity"] <= gv
    assert many.stats["contrastive_loss"] == pytest.approx(one.stats["contrastive_loss"], rel=0.25)
    assert math.log(6) * 0.5 < one.stats["contrastive_loss"] < math.log(6) * 2  # ~ chance with 1 + 5 candidates


def test_objective_normalises_exactly_like_the_loader():
    wavs = speech_like(2, 8000, seed=2)
    lengths = torch.full((2,), 8000)
    seen = []
    for normalize in (True, False):
        obj = build(dataclasses.replace(MICRO, normalize=normalize), SHORT, seed=0).eval()
        obj.model.wav2vec2.feature_extractor.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
        obj(wavs, lengths)
    assert torch.equal(seen[0], normalize_waveforms(wavs, lengths, HF_NORM_EPS))  # what HFUpstream does
    assert torch.equal(seen[1], wavs)
    on = build(MICRO, SHORT, seed=0).eval()

    def loss(x: torch.Tensor) -> float:
        torch.manual_seed(11)  # same masks and negatives
        return on(x, lengths).loss.item()

    assert loss(wavs) == pytest.approx(loss(5.0 * wavs - 0.01), abs=1e-5)  # loudness and DC invariant


def test_same_seed_same_initial_weights_and_default_size():
    a = build(Wav2Vec2ModelOptions(), Wav2Vec2ObjectiveOptions(), seed=7).state_dict()
    b = build(Wav2Vec2ModelOptions(), Wav2Vec2ObjectiveOptions(), seed=7).state_dict()
    c = build(Wav2Vec2ModelOptions(), Wav2Vec2ObjectiveOptions(), seed=8).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    exported = sum(v.numel() for k, v in a.items() if k.startswith("model.wav2vec2."))
    assert 100_000 <= exported <= 350_000
    assert OBJECTIVES["wav2vec2"].build is build


def test_base_size_is_buildable_by_overrides():
    base = Wav2Vec2ModelOptions(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                conv_dim=(512,) * 7, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
                                codevector_dim=256, proj_codevector_dim=256, num_codevectors_per_group=320)
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        obj = OBJECTIVES["wav2vec2"].build(base, Wav2Vec2ObjectiveOptions(), 0)
    params = sum(p.numel() for p in obj.model.wav2vec2.parameters())
    assert abs(params - 94.4e6) < 0.1e6  # facebook/wav2vec2-base's Wav2Vec2Model


def steady_codes(obj, seed: int) -> torch.Tensor:
    """Argmax quantiser codes ``[8, T, G]`` (edges dropped) of 1 s steady harmonic tones whose pitches are not
    multiples of the 50 Hz frame rate, so every frame samples the pitch period at another phase."""
    t = torch.arange(16000) / 16000.0
    f0s = 113.0 + 31.0 * torch.arange(8) + 7.0 * torch.rand(8, generator=torch.Generator().manual_seed(seed))
    wavs = torch.stack([sum(torch.sin(2 * math.pi * k * f0 * t + k) / k for k in range(1, 12)) for f0 in f0s])
    lengths = torch.full((8,), 16000)
    q = obj.model.quantizer
    with torch.no_grad():
        feats = obj.model.wav2vec2(normalize_waveforms(wavs, lengths, HF_NORM_EPS)).extract_features
        return q.weight_proj(feats).view(8, -1, q.num_groups, q.num_vars).argmax(-1)[:, 2:-2]


@pytest.mark.parametrize("seed", [0, 1])
def test_initial_targets_follow_the_sound_not_the_phase(seed):
    """The bug behind a loss stuck at ln(K + 1) on real audio: with kaiming conv kernels a steady tone gets a new
    code almost every frame (a function of the pitch phase at the frame hop), so the targets cannot be predicted from
    the context; the smoothed encoder keeps one or a few codes per steady sound."""
    def consecutive_same(codes: torch.Tensor) -> float:
        return float((codes[:, 1:] == codes[:, :-1]).all(dim=-1).float().mean())

    smooth = steady_codes(build(Wav2Vec2ModelOptions(), Wav2Vec2ObjectiveOptions(), seed=seed).eval(), seed)
    kaiming = steady_codes(build(Wav2Vec2ModelOptions(), Wav2Vec2ObjectiveOptions(feature_encoder_init="kaiming"),
                                 seed=seed).eval(), seed)
    frames = smooth.shape[1]  # 45
    distinct = [len(set(map(tuple, codes.tolist()))) for codes in smooth]
    assert consecutive_same(smooth) > 0.6 and sum(distinct) / 8 <= 5, distinct
    assert consecutive_same(kaiming) < 0.15  # what HF / fairseq initialisation gives (about 0.0-0.07)
    assert sum(len(set(map(tuple, codes.tolist()))) for codes in kaiming) / 8 > frames / 4


def test_smooth_init_averages_taps_of_a_random_channel_mix():
    obj = build(MICRO, dataclasses.replace(SHORT, smooth_init_noise=0.0), seed=0)
    layers = obj.model.wav2vec2.feature_extractor.conv_layers
    for layer in layers[1:]:
        w = layer.conv.weight  # [C_out, C_in, k]: every tap the same
        assert torch.equal(w, w[..., :1].expand_as(w))
        mix_std = float((w[..., 0] * w.shape[2]).detach().std())  # the channel mix: kaiming scale for C_in inputs
        assert mix_std == pytest.approx((2.0 / w.shape[1]) ** 0.5, rel=0.35)
    first = layers[0].conv.weight
    assert not torch.equal(first, first[..., :1].expand_as(first))  # the first layer stays a random filterbank
    noisy = build(MICRO, SHORT, seed=0).model.wav2vec2.feature_extractor.conv_layers[1].conv.weight
    assert not torch.equal(noisy, noisy[..., :1].expand_as(noisy))
    with pytest.raises(ValueError, match="feature_encoder_init"):
        build(MICRO, dataclasses.replace(SHORT, feature_encoder_init="xavier"), seed=0)


@pytest.mark.slow
def test_contrastive_loss_goes_down_on_a_fixed_batch():
    obj = build(Wav2Vec2ModelOptions(), Wav2Vec2ObjectiveOptions(mask_time_length=5, num_negatives=20), seed=0)
    wavs = speech_like(4, 32000, seed=3)
    lengths = torch.full((4,), 32000)

    before, after = train_on_fixed_batch(obj, wavs, lengths, steps=40, lr=5e-4)
    assert math.isfinite(after["contrastive_loss"])
    assert after["contrastive_loss"] < before["contrastive_loss"] - 0.3, (before, after)
    assert after["accuracy"] > before["accuracy"]


@pytest.mark.slow
def test_contrastive_loss_goes_below_chance_on_fresh_batches():
    """Unlike a fixed batch, which any init can memorise, fresh audio every step needs predictable targets: with
    kaiming conv kernels this stays at ln(1 + K) (about 1.00 x chance, accuracy 0.07)."""
    options = Wav2Vec2ObjectiveOptions(mask_time_prob=0.5, mask_time_length=3, num_negatives=20)  # the recipe's masks
    obj = build(Wav2Vec2ModelOptions(), options, seed=0).train()
    optimizer = torch.optim.AdamW(obj.parameters(), lr=1e-3)
    losses, accuracies = [], []
    for step in range(60):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 20)
        out = obj(speech_like(4, 16000, seed=100 + step), torch.full((4,), 16000))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.stats["contrastive_loss"])
        accuracies.append(out.stats["accuracy"])
    chance = math.log(1 + 20)
    assert sum(losses[-20:]) / 20 < 0.85 * chance, losses  # about 0.73 x chance
    assert sum(accuracies[-20:]) / 20 > 0.3, accuracies  # about 0.46; chance is below 0.1


def test_export_loads_with_our_registry_and_transformers(tmp_path):
    obj = build(Wav2Vec2ModelOptions(), Wav2Vec2ObjectiveOptions(), seed=0)
    out = tmp_path / "upstream"
    out.mkdir()
    obj.export(out, {"step": 12, "recipe": "test"})
    meta = json.loads((out / "speechbench.json").read_text())
    assert meta["family"] == "wav2vec2" and meta["normalize"] is True and meta["step"] == 12
    assert json.loads((out / "preprocessor_config.json").read_text())["do_normalize"] is True
    model, info = Wav2Vec2Model.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    upstream = build_upstream(str(out))
    assert upstream.num_layers == Wav2Vec2ModelOptions().num_hidden_layers + 1
    wavs = speech_like(2, 16000, seed=4)
    lengths = torch.full((2,), 16000)
    got = upstream(wavs, lengths)
    assert got.hidden.shape == (2, 4, 49, 96)
    obj.eval()
    with torch.no_grad():  # the loader sees what pretraining saw: the same normalised waveform, the same weights
        ref = obj.model.wav2vec2(normalize_waveforms(wavs, lengths, HF_NORM_EPS)).last_hidden_state
    torch.testing.assert_close(got.hidden[:, -1], ref, atol=1e-5, rtol=1e-4)


def test_feature_grad_mult_scales_only_the_conv_encoder_gradient():
    wavs = speech_like(2, 8000, seed=5)
    lengths = torch.full((2,), 8000)
    grads, losses = [], []
    for mult in (1.0, 0.1):
        obj = build(MICRO, dataclasses.replace(SHORT, feature_grad_mult=mult), seed=0).eval()  # eval: no Gumbel noise
        torch.manual_seed(2)
        loss = obj(wavs, lengths).loss
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in obj.named_parameters() if p.grad is not None})
        losses.append(loss.item())
    assert losses[0] == losses[1]  # the forward is unchanged
    conv = [k for k in grads[0] if ".feature_extractor." in k]
    assert conv and all(torch.allclose(grads[1][k], 0.1 * grads[0][k], rtol=1e-4, atol=1e-6) for k in conv)
    assert all(torch.allclose(grads[1][k], grads[0][k], atol=1e-6) for k in grads[0] if k not in conv)
