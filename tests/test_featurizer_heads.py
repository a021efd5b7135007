import pytest
import torch

from speechbench.downstreams.featurizer import WeightedLayerSum
from speechbench.downstreams.heads import UtteranceLevelHead, masked_mean
from speechbench.downstreams.metrics import accuracy_percent, majority_class_rate_percent


def test_weighted_sum_starts_uniform_and_passes_single_layer():
    hidden = torch.randn(2, 3, 5, 4)
    ws = WeightedLayerSum(3)
    assert torch.allclose(ws(hidden), hidden.mean(dim=1), atol=1e-6)
    assert ws.layer_weights() == pytest.approx([1 / 3] * 3)
    one = torch.randn(2, 1, 5, 4)
    assert torch.equal(WeightedLayerSum(1)(one), one[:, 0])
    probe = WeightedLayerSum(3, layer=2)
    assert torch.equal(probe(hidden), hidden[:, 2]) and probe.layer_weights() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="out of range"):
        WeightedLayerSum(3, layer=3)


def test_weighted_sum_follows_softmax_weights():
    hidden = torch.randn(2, 2, 5, 4)
    ws = WeightedLayerSum(2)
    with torch.no_grad():
        ws.weights.copy_(torch.tensor([0.0, torch.log(torch.tensor(3.0))]))  # softmax -> [0.25, 0.75]
    assert torch.allclose(ws(hidden), 0.25 * hidden[:, 0] + 0.75 * hidden[:, 1], atol=1e-6)
    ln = WeightedLayerSum(2, layer_norm=True)
    out = ln(hidden * 10 + 3)
    assert torch.allclose(out, ln(hidden), atol=1e-4)  # layer norm removes per-frame scale and offset
    with pytest.raises(ValueError, match="not pooled"):
        ln(hidden.mean(dim=2))


def test_masked_mean_ignores_padding():
    x = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [4.0], [6.0]]])
    assert masked_mean(x, torch.tensor([2, 3])).flatten().tolist() == [2.0, 4.0]


def test_pooled_path_equals_frame_path_loss_and_gradients():
    """Training on per-layer time-means is exactly training on frames for the utterance-level head."""
    torch.manual_seed(0)
    hidden = torch.randn(4, 3, 7, 6)
    lengths = torch.tensor([7, 5, 3, 6])
    mask = (torch.arange(7)[None] < lengths[:, None]).float()[:, None, :, None]
    pooled = (hidden * mask).sum(2) / lengths[:, None, None]
    target = torch.tensor([0, 2, 1, 2])
    grads, losses = [], []
    for frames in (True, False):
        torch.manual_seed(1)
        ws, head = WeightedLayerSum(3), UtteranceLevelHead(6, 5, 3)
        with torch.no_grad():
            ws.weights.copy_(torch.tensor([0.3, -0.2, 0.5]))
        x = ws(hidden) if frames else ws(pooled)
        loss = torch.nn.functional.cross_entropy(head(x, lengths if frames else None), target)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in (*ws.parameters(), *head.parameters())])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for g_frames, g_pooled in zip(*grads, strict=True):
        assert torch.allclose(g_frames, g_pooled, atol=1e-6)


def test_accuracy_and_majority_rate_by_hand():
    assert accuracy_percent(["a", "b", "b", "c"], ["a", "b", "c", "c"]) == 75.0
    assert majority_class_rate_percent(["x", "y", "y"], ["y", "x", "x", "y", "z"]) == 40.0
    with pytest.raises(ValueError):
        accuracy_percent(["a"], ["a", "b"])
