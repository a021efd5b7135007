"""HuBERT pretraining: frame-aligned k-means targets, masks, k-means, learning, export, iteration 2 from a teacher."""

import dataclasses
import json
import math

import pytest
import torch
from helpers import train_on_fixed_batch

from speechbench.upstreams.hf import HF_NORM_EPS, normalize_waveforms
from speechbench.upstreams.pretrain.base import OBJECTIVES
from speechbench.upstreams.pretrain.hubert import (
    HubertModelOptions,
    HubertObjectiveOptions,
    build,
    mfcc_features,
)
from speechbench.upstreams.pretrain.kmeans import assign_clusters, fit_kmeans
from speechbench.upstreams.registry import build_upstream

# a very small model for the mechanics tests (the default bundled size is used for learning and export)
MICRO = HubertModelOptions(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           conv_dim=(8,) * 7, num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4)
FEW = HubertObjectiveOptions(num_clusters=8, kmeans_n_init=1)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def speech_like(batch: int, num_samples: int, seed: int) -> torch.Tensor:
    """``[B, S]`` seeded voiced-like audio: gliding pitch, 15 harmonics weighted by two formants that jump every
    100 ms (syllables), noise and random loudness."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(num_samples) / 16000.0
    segment = (t / 0.1).long()
    k = torch.arange(1, 16)[:, None]
    out = []
    for _ in range(batch):
        glide = 30 * torch.sin(2 * math.pi * (0.5 + torch.rand(1, generator=g)) * t)
        f0 = 100 + 120 * torch.rand(1, generator=g) + glide
        phase = 2 * math.pi * torch.cumsum(f0, 0) / 16000.0
        formants = 300 + 2200 * torch.rand(int(segment.max()) + 1, 2, generator=g)[segment]  # [S, 2]
        freq = k * f0  # [15, S]
        weight = sum(torch.exp(-((freq - formants[:, j]) / 250.0) ** 2) for j in range(2)) + 0.05
        wav = (weight * torch.sin(k * phase) / k).sum(0) + 0.05 * torch.randn(num_samples, generator=g)
        out.append(wav / wav.abs().max() * (0.1 + 0.8 * torch.rand(1, generator=g)))
    return torch.stack(out)


def batches(count: int, batch: int, num_samples: int, seed: int):
    for i in range(count):
        yield speech_like(batch, num_samples, seed + i), torch.full((batch,), num_samples)


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


def test_kmeans_targets_are_one_per_frame_and_aligned():
    obj = build(MICRO, FEW, seed=0).eval()
    obj.prepare(batches(1, 4, 16000, seed=0), lambda msg: None)
    for num_samples in (400, 1000, 16000, 16001, 16319, 16320, 16400, 16719, 24123, 32000):
        wavs = speech_like(2, num_samples, seed=num_samples)
        lengths = torch.full((2,), num_samples)
        with torch.no_grad():
            model_frames = obj.model(wavs).last_hidden_state.shape[1]
        assert obj.num_frames(num_samples) == model_frames == 1 + (num_samples - 400) // 320
        feats = mfcc_features(wavs, lengths, model_frames)
        assert feats.shape == (2, model_frames, 39) and torch.isfinite(feats).all()
        targets = obj.targets(wavs, lengths, model_frames)
        assert targets.shape == (2, model_frames) and targets.dtype == torch.long
        assert 0 <= int(targets.min()) and int(targets.max()) < 8
    # model frame t covers samples [320 t, 320 t + 400): its cepstra c1..c12 (c0 carries the gain) are those of that
    # window alone, so the labels sit on the frames they describe
    wav = speech_like(1, 16000, seed=9)
    feats = mfcc_features(wav, torch.tensor([16000]), 49)
    for t in (0, 7, 48):
        alone = mfcc_features(wav[:, 320 * t: 320 * t + 400], torch.tensor([400]), 1)
        torch.testing.assert_close(alone[0, 0, 1:13], feats[0, t, 1:13], atol=2e-3, rtol=1e-3)
    # more frames than the features have (another conv stack): the last frame is repeated, never a short label row
    longer = mfcc_features(wav, torch.tensor([16000]), 52)
    assert longer.shape[1] == 52 and torch.equal(longer[:, 49:], longer[:, 48:49].expand(-1, 3, -1))


def test_masks_match_the_configuration():
    p, span, frames, batch = 0.8, 10, 99, 2000
    obj = build(MICRO, dataclasses.replace(FEW, mask_time_prob=p, mask_time_length=span), seed=0)
    mask = obj.sample_mask(batch, frames, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (batch, frames) and mask.dtype == torch.bool
    assert min(r for row in mask[:200] for r in _runs(row)) >= span  # unions of whole spans
    # int(p T / M + U[0, 1)) = 7 or 8 distinct starts among N = T - M + 1 positions; frame t stays unmasked when none
    # of the c_t starts covering it is drawn (hypergeometric)
    positions, mean_starts = frames - span + 1, p * frames / span
    expected = 0.0
    for n, weight in ((7, 8 - mean_starts), (8, mean_starts - 7)):
        for t in range(frames):
            c = min(t, positions - 1) - max(0, t - span + 1) + 1
            expected += weight * (1.0 - math.prod((positions - c - i) / (positions - i) for i in range(n))) / frames
    assert 0.5 < expected < 0.6  # ~ 1 - (1 - p / M) ** M = 0.57 away from the edges
    assert abs(mask.float().mean().item() - expected) < 0.01
    # shorter spans for short crops
    short = build(MICRO, dataclasses.replace(FEW, mask_time_length=5), seed=0)
    mask5 = short.sample_mask(500, 99, generator=torch.Generator().manual_seed(1))
    runs = [r for row in mask5 for r in _runs(row)]
    assert min(runs) == 5 and abs(mask5.float().mean().item() - (1 - (1 - 0.8 / 5) ** 5)) < 0.05
    # forward masks exactly those frames: the transformer sees masked_spec_embed there and the projection elsewhere
    obj.prepare(batches(1, 4, 16000, seed=0), lambda msg: None)
    seen = []
    obj.model.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    wavs, lengths = speech_like(3, 16000, seed=1), torch.full((3,), 16000)
    torch.manual_seed(5)
    expected_mask = obj.sample_mask(3, 49)
    torch.manual_seed(5)
    stats = obj.train()(wavs, lengths).stats
    assert stats["mask_fraction"] == pytest.approx(expected_mask.float().mean().item())
    embed = obj.model.masked_spec_embed.detach()
    assert torch.equal(seen[0][expected_mask], embed.expand(int(expected_mask.sum()), -1))
    assert not (seen[0][~expected_mask] == embed).all(-1).any()


def test_kmeans_is_deterministic_and_assigns_the_nearest_centroid():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    points = (centers[:, None] + 0.3 * torch.randn(3, 200, 2, generator=g)).reshape(-1, 2)
    a, b = fit_kmeans(points, 3, seed=0), fit_kmeans(points, 3, seed=0)
    assert a.shape == (3, 2) and torch.equal(a, b)
    assert torch.cdist(centers, a).min(dim=1).values.max() < 0.1  # one centroid at each blob's centre
    # hand-built points against hand-built centroids (including one just either side of a midpoint)
    cents = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = torch.tensor([[[1.0, 1.0], [9.0, -1.0], [-1.0, 8.0]], [[4.99, 0.0], [5.01, 0.0], [3.0, 6.0]]])
    assert assign_clusters(pts, cents).tolist() == [[0, 1, 2], [0, 1, 2]]
    # random points: the same answer as a brute-force search
    feats = torch.randn(4, 30, 5, generator=g)
    cents = torch.randn(7, 5, generator=g)
    brute = [[min(range(7), key=lambda k: float(((feats[i, t] - cents[k]) ** 2).sum())) for t in range(30)]
             for i in range(4)]
    assert assign_clusters(feats, cents).tolist() == brute
    with pytest.raises(ValueError, match="at least num_clusters"):
        fit_kmeans(points[:2], 3, seed=0)


@pytest.fixture(scope="module")
def iteration1(tmp_path_factory):
    """An iteration-1 objective (default size) after prepare() and 40 Adam steps, its export directory, and the
    masked loss/accuracy before and after training on a fixed batch."""
    torch.set_num_threads(1)
    obj = build(HubertModelOptions(), HubertObjectiveOptions(mask_time_length=5), seed=0)
    logs = []
    obj.prepare(batches(3, 8, 32000, seed=100), logs.append)
    wavs, lengths = speech_like(4, 32000, seed=3), torch.full((4,), 32000)

    before, after = train_on_fixed_batch(obj, wavs, lengths, steps=40, lr=1e-3)
    out_dir = tmp_path_factory.mktemp("hubert") / "iter1"
    out_dir.mkdir()
    obj.export(out_dir, {"step": 40, "recipe": "test"})
    return {"objective": obj, "dir": out_dir, "before": before, "after": after, "logs": logs}


@pytest.mark.slow
def test_iteration1_prepare_fits_kmeans_and_the_loss_goes_down(iteration1):
    obj, before, after = iteration1["objective"], iteration1["before"], iteration1["after"]
    assert int(obj.kmeans_frames) == 3 * 8 * 99  # every frame of the three prepare batches (under the maximum)
    assert obj.centroids.shape == (50, 39) and obj.centroids.abs().sum() > 0
    assert "k-means of MFCC (39-d) on 2376 frames: 50/50 clusters used" in iteration1["logs"][0]
    assert math.isfinite(after["masked_loss"])
    assert after["masked_loss"] < before["masked_loss"] - 0.5, (before, after)
    assert after["masked_accuracy"] > before["masked_accuracy"] + 0.1, (before, after)
    # resume skips prepare(): centroids, mean and std come back from the state dict and give the same targets
    state = obj.state_dict()
    assert {"centroids", "feature_mean", "feature_std", "kmeans_frames"} <= set(state)
    resumed = build(HubertModelOptions(), HubertObjectiveOptions(mask_time_length=5), seed=1)
    with pytest.raises(RuntimeError, match="prepare"):
        resumed(speech_like(1, 16000, seed=0), torch.tensor([16000]))
    resumed.load_state_dict(state)
    wavs, lengths = speech_like(2, 16000, seed=7), torch.full((2,), 16000)
    assert torch.equal(resumed.targets(wavs, lengths, 49), obj.targets(wavs, lengths, 49))
    # targets do not depend on the crop's loudness
    assert torch.equal(obj.targets(3.0 * wavs, lengths, 49), obj.targets(wavs, lengths, 49))


def test_iteration1_export_loads_with_our_registry(iteration1):
    out, obj = iteration1["dir"], iteration1["objective"]
    meta = json.loads((out / "speechbench.json").read_text())
    assert meta["family"] == "hubert" and meta["normalize"] is True and meta["step"] == 40
    assert meta["hubert"]["iteration"] == 1 and meta["hubert"]["num_clusters"] == 50
    assert meta["hubert"]["teacher"] is None and meta["hubert"]["kmeans_frames"] == 3 * 8 * 99
    upstream = build_upstream(str(out))
    assert upstream.family == "hubert" and upstream.num_layers == HubertModelOptions().num_hidden_layers + 1
    wavs, lengths = speech_like(2, 16000, seed=4), torch.full((2,), 16000)
    got = upstream(wavs, lengths)
    assert got.hidden.shape == (2, 4, 49, 96)
    obj.eval()
    with torch.no_grad():  # the loader sees what pretraining saw: the same normalised waveform, the same weights
        ref = obj.model(normalize_waveforms(wavs, lengths, HF_NORM_EPS)).last_hidden_state
    torch.testing.assert_close(got.hidden[:, -1], ref, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in upstream.parameters()) == sum(p.numel() for p in obj.model.parameters())


def test_iteration2_clusters_the_teachers_layer_and_trains(iteration1):
    teacher_dir = str(iteration1["dir"])
    opts = HubertObjectiveOptions(iteration=2, teacher=teacher_dir, mask_time_length=5, kmeans_n_init=1)
    obj = build(MICRO, opts, seed=0)
    assert obj.teacher_layer == 2 and obj.num_clusters == 100  # middle of hidden states 0..3; iteration-2 default
    assert obj.centroids.shape == (100, 96)
    # the teacher is frozen and not part of the trained state
    assert not any(k.startswith(("_teacher", "teacher.")) for k in obj.state_dict())
    assert sum(v.numel() for v in obj.state_dict().values()) < 60_000  # MICRO + 100 x 96 centroids, no teacher
    assert all(p.requires_grad for p in obj.parameters())
    obj.prepare(batches(2, 4, 32000, seed=200), lambda msg: None)
    assert int(obj.kmeans_frames) == 2 * 4 * 99
    obj.train()
    assert not obj.teacher.training
    # targets: the nearest centroid of the standardised layer-2 hidden state of the exported iteration-1 model
    wavs, lengths = speech_like(2, 32000, seed=8), torch.full((2,), 32000)
    with torch.no_grad():
        hidden = build_upstream(teacher_dir)(wavs, lengths).hidden[:, 2]
    want = assign_clusters((hidden - obj.feature_mean) / obj.feature_std, obj.centroids)
    assert torch.equal(obj.targets(wavs, lengths, 99), want)
    optimizer = torch.optim.Adam(obj.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        out = obj(wavs, lengths)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    meta_dir = iteration1["dir"].parent / "iter2"
    meta_dir.mkdir()
    obj.export(meta_dir, {})
    meta = json.loads((meta_dir / "speechbench.json").read_text())["hubert"]
    assert meta["iteration"] == 2 and meta["teacher"] == teacher_dir and meta["teacher_layer"] == 2
    assert meta["teacher_sha256"] and meta["num_clusters"] == 100
    # resuming against a teacher whose weights changed since prepare() is an error, not silently other targets
    other = build(MICRO, opts, seed=0)
    other.load_state_dict({**obj.state_dict(), "teacher_fingerprint": obj.teacher_fingerprint + 1})
    with pytest.raises(RuntimeError, match="changed since prepare"):
        other(wavs, lengths)
    with pytest.raises(ValueError, match=r"objective\.teacher_layer must be in \[0, 3\]"):
        build(MICRO, dataclasses.replace(opts, teacher_layer=4), seed=0)


@pytest.mark.parametrize(("options", "message"), [
    (HubertObjectiveOptions(iteration=2), r"objective\.teacher is required for iteration 2"),
    (HubertObjectiveOptions(iteration=1, teacher="some/dir"), r"objective\.teacher applies to iteration 2 only"),
    (HubertObjectiveOptions(iteration=3), r"objective\.iteration must be 1 or 2"),
    (HubertObjectiveOptions(num_clusters=1), r"objective\.num_clusters must be >= 2"),
])
def test_option_errors_are_one_line(options, message):
    with pytest.raises(ValueError, match=message) as info:
        build(MICRO, options, seed=0)
    assert "\n" not in str(info.value)


def test_objective_normalises_exactly_like_the_loader():
    wavs, lengths = speech_like(2, 8000, seed=2), torch.full((2,), 8000)
    seen = []
    for normalize in (True, False):
        obj = build(dataclasses.replace(MICRO, normalize=normalize), FEW, seed=0)
        obj.prepare(batches(1, 2, 16000, seed=0), lambda msg: None)
        obj.model.feature_extractor.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
        obj(wavs, lengths)
    assert torch.equal(seen[0], normalize_waveforms(wavs, lengths, HF_NORM_EPS))  # what HFUpstream does
    assert torch.equal(seen[1], wavs)


def test_same_seed_same_initial_weights_default_size_and_base():
    a = build(HubertModelOptions(), HubertObjectiveOptions(), seed=7).state_dict()
    b = build(HubertModelOptions(), HubertObjectiveOptions(), seed=7).state_dict()
    c = build(HubertModelOptions(), HubertObjectiveOptions(), seed=8).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    exported = sum(v.numel() for k, v in a.items() if k.startswith("model."))
    assert 100_000 <= exported <= 350_000
    assert a["label_embeddings"].shape == (50, 64) and a["final_proj.weight"].shape == (64, 96)
    assert OBJECTIVES["hubert"].build is build
    base = HubertModelOptions(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              conv_dim=(512,) * 7, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16)
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        obj = build(base, HubertObjectiveOptions(final_dim=256, num_clusters=100), 0)
    assert abs(sum(p.numel() for p in obj.model.parameters()) - 94.37e6) < 0.05e6  # facebook/hubert-base-ls960
