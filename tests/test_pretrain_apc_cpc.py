"""APC and CPC pretraining objectives: the losses on hand-built inputs, learning, seeding, export -> upstream."""

import math

import pytest
import torch

import speechbench.upstreams.pretrain.apc  # noqa: F401  (registration)
import speechbench.upstreams.pretrain.cpc  # noqa: F401  (registration)
from speechbench.upstreams.pretrain.apc import apc_loss
from speechbench.upstreams.pretrain.base import OBJECTIVES
from speechbench.upstreams.pretrain.cpc import info_nce, sample_negatives
from speechbench.upstreams.registry import build_upstream


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here is small: one thread, no spin-waiting on a shared machine."""


def synthetic_speech(batch: int = 4, samples: int = 16000, seed: int = 0) -> torch.Tensor:
    """``[batch, samples]`` voiced-speech stand-ins: 8 harmonics of a slowly gliding pitch, a syllable-rate
    envelope, a little noise and a random loudness."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples, dtype=torch.float64) / 16000
    wavs = []
    for _ in range(batch):
        f0, glide, rate, syllables = (torch.rand(4, generator=g, dtype=torch.float64) * torch.tensor(
            [120.0, 0.3, 1.5, 3.0], dtype=torch.float64) + torch.tensor([90.0, 0.1, 0.5, 2.0], dtype=torch.float64))
        pitch = f0 * (1 + glide * torch.sin(2 * math.pi * rate * t))
        phase = 2 * math.pi * torch.cumsum(pitch, 0) / 16000
        voiced = sum(torch.sin(h * phase) / h for h in range(1, 9))
        envelope = 0.5 * (1 - torch.cos(2 * math.pi * syllables * t))
        wav = voiced * envelope + 0.02 * torch.randn(samples, generator=g, dtype=torch.float64)
        loudness = 0.05 + 0.5 * torch.rand((), generator=g, dtype=torch.float64)
        wavs.append(wav / wav.abs().max() * loudness)
    return torch.stack(wavs).float()


# ---------------------------------------------------------------------------------------------------------------
# The losses on hand-built inputs
# ---------------------------------------------------------------------------------------------------------------


def test_apc_loss_is_the_l1_distance_of_shifted_frames():
    feats = torch.tensor([[[0, 0], [1, 2], [3, 5], [6, 9]],
                          [[1, 1], [2, 0], [4, 4], [7, 7]]], dtype=torch.float32)  # [B=2, T=4, M=2]
    predicted = torch.tensor([[[1, 1], [3, 3], [0, 0], [9, 9]],
                              [[2, 2], [2, 2], [8, 8], [9, 9]]], dtype=torch.float32)
    lengths = torch.tensor([4, 3])  # the second utterance's last frame is padding
    # n = 1: pairs (t, t+1) with t + 1 < length -> utterance 0: t = 0, 1, 2; utterance 1: t = 0, 1
    #   u0: |[1,1]-[1,2]| = 0+1, |[3,3]-[3,5]| = 0+2, |[0,0]-[6,9]| = 6+9;  u1: |[2,2]-[2,0]| = 0+2, |[2,2]-[4,4]| = 2+2
    expected = (1 + 2 + 15 + 2 + 4) / (5 * 2)
    assert apc_loss(predicted, feats, lengths, 1).item() == pytest.approx(expected)
    # n = 2: u0: t = 0, 1 -> |[1,1]-[3,5]| = 2+4, |[3,3]-[6,9]| = 3+6; u1: t = 0 -> |[2,2]-[4,4]| = 2+2
    assert apc_loss(predicted, feats, lengths, 2).item() == pytest.approx((6 + 9 + 4) / (3 * 2))
    # predicting the shifted input exactly costs nothing; nothing to predict at all gives 0 (and keeps the graph)
    assert apc_loss(feats[:, 1:], feats, lengths, 1).item() == 0.0
    x = predicted.clone().requires_grad_()
    empty = apc_loss(x, feats, lengths, 4)
    empty.backward()
    assert empty.item() == 0.0 and x.grad.abs().sum().item() == 0.0


def test_info_nce_near_zero_when_the_prediction_picks_the_positive_and_log_k_plus_1_when_it_cannot():
    dim, k = 8, 5
    basis = torch.eye(dim)
    positives = basis[:3]  # three positions, each positive a unit vector
    negatives = torch.stack([basis[3:3 + k]] * 3)  # [3, K, D], orthogonal to every positive
    loss, accuracy = info_nce(100 * positives, positives, negatives)
    assert loss.item() < 1e-6 and accuracy.item() == 1.0
    # all candidates identical: the scores tie, the loss is the uniform guess log(K + 1), nothing is "picked"
    same = torch.ones(3, dim)
    loss, accuracy = info_nce(torch.randn(3, dim), same, same[:, None].expand(3, k, dim))
    assert loss.item() == pytest.approx(math.log(k + 1), abs=1e-5) and accuracy.item() == 0.0
    # a zero prediction scores every candidate 0
    loss, _ = info_nce(torch.zeros(3, dim), positives, negatives)
    assert loss.item() == pytest.approx(math.log(k + 1), abs=1e-6)
    # pointing at a negative instead: large loss, accuracy 0; the mask keeps only the chosen positions
    wrong = 100 * negatives[:, 0]
    loss, accuracy = info_nce(wrong, positives, negatives)
    assert loss.item() > 50 and accuracy.item() == 0.0
    predictions = torch.cat([100 * positives[:2], wrong[2:]])
    loss, accuracy = info_nce(predictions, positives, negatives, mask=torch.tensor([True, True, False]))
    assert loss.item() < 1e-6 and accuracy.item() == 1.0


def test_cpc_negatives_come_uniformly_from_valid_frames_of_the_whole_batch():
    # frame (b, t) carries the value 10 b + t in every channel; utterance 1 has 2 valid frames of 5
    encoded = (10 * torch.arange(2)[:, None] + torch.arange(5)[None, :]).float()[..., None].expand(2, 5, 3)
    torch.manual_seed(0)
    picks = sample_negatives(encoded, torch.tensor([5, 2]), 400)
    assert picks.shape == (2, 5, 400, 3)
    values = picks[..., 0].long()
    assert set(values.unique().tolist()) == {0, 1, 2, 3, 4, 10, 11}  # never a padded frame, both utterances
    share = (values >= 10).float().mean().item()
    assert share == pytest.approx(2 / 7, abs=0.03)
    torch.manual_seed(0)
    assert torch.equal(sample_negatives(encoded, torch.tensor([5, 2]), 400), picks)  # torch's RNG decides


# ---------------------------------------------------------------------------------------------------------------
# Both families through the registry: learning, seeding, export -> upstream
# ---------------------------------------------------------------------------------------------------------------


def build(family: str, seed: int = 0, **objective):
    entry = OBJECTIVES[family]
    return entry.build(entry.model_options(), entry.objective_options(**objective), seed)


def reference_hidden(objective, wavs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained modules' own layer outputs ``[B, L, T, D]`` and frame counts, computed without the loader."""
    with torch.no_grad():
        if objective.family == "apc":
            feats, counts = objective.features(wavs, lengths)
            return torch.stack(objective.model(feats, counts)[1], dim=1), counts
        context, encoded, frames = objective.encode(wavs, lengths)
        return torch.stack([encoded, context], dim=1), frames


@pytest.mark.slow
@pytest.mark.parametrize("family, steps, lr, exported", [("apc", 50, 1e-3, 289_104), ("cpc", 50, 1e-3, 116_800)])
def test_objective_learns_exports_and_loads_as_an_upstream(tmp_path, family, steps, lr, exported):
    objective = build(family)
    assert objective.family == family
    weights = objective.model.state_dict()
    assert sum(v.numel() for v in weights.values()) == exported  # the bundled size (100k-350k)
    wavs = synthetic_speech()
    lengths = torch.full((4,), wavs.shape[1])
    optimizer = torch.optim.Adam(objective.parameters(), lr=lr)
    torch.manual_seed(1)
    losses, stats = [], []
    objective.train()
    for _ in range(steps):
        out = objective(wavs, lengths)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        stats.append(out.stats)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses
    if family == "apc":  # better than copying frame t as the guess of frame t + n
        assert last < 0.8 * stats[-1]["copy_l1"]
    else:  # the positive is picked far above chance (1 / 65)
        assert sum(s["accuracy"] for s in stats[-5:]) / 5 > 0.15

    objective.export(tmp_path / "up", {"pretraining": {"seed": 0}})
    up = build_upstream(str(tmp_path / "up"))
    assert (up.family, up.num_layers, up.hidden_size) == (family, 3 if family == "apc" else 2,
                                                          128 if family == "apc" else 64)
    assert up.checkpoint_format == "speechbench"
    objective.eval()
    test_wavs, test_lengths = synthetic_speech(2, 12000, seed=5), torch.tensor([12000, 7000])
    test_wavs[1, 7000:] = 0
    expected, frames = reference_hidden(objective, test_wavs, test_lengths)
    with torch.inference_mode():
        out = up(test_wavs, test_lengths)
    assert out.lengths.tolist() == frames.tolist()
    for b, n in enumerate(frames.tolist()):
        torch.testing.assert_close(out.hidden[b, :, :n], expected[b, :, :n], atol=1e-5, rtol=1e-4)


def time_varying_share(frames: torch.Tensor) -> float:
    """Share of the frames' energy ``[B, T, D]`` that changes over time within each utterance."""
    return float((frames - frames.mean(1, keepdim=True)).pow(2).sum(-1).mean() / frames.pow(2).sum(-1).mean())


def test_cpc_starts_from_zero_predictors_and_a_bias_free_first_conv_so_frames_differ():
    objective = build("cpc")
    assert all(p.weight.abs().sum().item() == 0 for p in objective.predictors)
    encoder = objective.model.gEncoder
    assert encoder.conv0.bias.abs().sum().item() == 0 and encoder.conv1.bias.abs().sum().item() > 0
    wavs = synthetic_speech()
    lengths = torch.full((4,), wavs.shape[1])
    with torch.no_grad():
        context, encoded, _ = objective.encode(wavs, lengths)
    # with CPCModel's default first-conv bias these shares are 0.085 and 0.048: every frame ~ the bias pattern
    assert time_varying_share(encoded) > 0.15 and time_varying_share(context) > 0.08
    # zero predictors score every candidate 0: the first loss is exactly chance, log(N + 1)
    assert objective(wavs, lengths).loss.item() == pytest.approx(math.log(65), abs=1e-5)


@pytest.mark.slow
def test_cpc_leaves_chance_at_once_on_fresh_utterances():
    # new utterances every step, as the loop draws them (a fixed batch can be memorised); the tiny size of
    # tests/test_pretrain_loop.py. With the default first-conv bias the loss stays at log(17) (0.92-1.0x after 40 steps)
    entry = OBJECTIVES["cpc"]
    objective = entry.build(entry.model_options(hidden_encoder=32, hidden_gar=32),
                            entry.objective_options(prediction_steps=4, num_negatives=16), 0)
    optimizer = torch.optim.Adam(objective.parameters(), lr=2e-3)
    torch.manual_seed(1)
    losses, accuracies = [], []
    for step in range(40):
        wavs = synthetic_speech(seed=1000 + step)
        out = objective(wavs, torch.full((4,), wavs.shape[1]))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        accuracies.append(out.stats["accuracy"])
    assert losses[0] == pytest.approx(math.log(17), abs=1e-5)
    assert sum(losses[-5:]) / 5 < 0.8 * math.log(17), losses  # measured 0.63x
    assert sum(accuracies[-5:]) / 5 > 0.2, accuracies  # chance 1/17; measured 0.32


@pytest.mark.parametrize("family", ["apc", "cpc"])
def test_same_seed_builds_identical_weights(family):
    a, b, c = build(family, seed=3), build(family, seed=3), build(family, seed=4)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    if family == "cpc":  # the predictors are trained but not exported
        assert len(a.predictors) == 12 and not any(k.startswith("predictors") for k in a.model.state_dict())


def test_builders_reject_settings_the_upstream_cannot_load():
    entry = OBJECTIVES["cpc"]
    with pytest.raises(ValueError, match="hidden_gar"):
        entry.build(entry.model_options(hidden_encoder=64, hidden_gar=32), entry.objective_options(), 0)
    apc = OBJECTIVES["apc"]
    with pytest.raises(ValueError, match="n_future"):
        apc.build(apc.model_options(), apc.objective_options(n_future=0), 0)
