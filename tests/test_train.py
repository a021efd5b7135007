"""The training loop: deterministic, keeps the best dev checkpoint, resumes to the same result."""

import dataclasses
from collections import Counter

import pytest
import torch

from speechbench.benchmark.config import RunConfig, TrainConfig
from speechbench.benchmark.features import PooledFeatures
from speechbench.benchmark.train import BatchSchedule, DownstreamModel, evaluate, train, weighted_resample
from speechbench.downstreams.featurizer import WeightedLayerSum
from speechbench.downstreams.heads import UtteranceLevelHead
from speechbench.downstreams.ks import KSOptions
from speechbench.downstreams.tasks import Task
from speechbench.runtime import Runtime


class Interrupt(Exception):
    pass


def _task() -> Task:
    return Task(name="toy", metric="accuracy", unit="%", higher_is_better=True, granularity="pooled",
                options_cls=KSOptions, prepare=None, targets=None, build_head=None,
                loss=torch.nn.functional.cross_entropy,
                predict=lambda logits, lengths: logits.argmax(-1).tolist(), references=None,
                score=lambda p, r: {"accuracy": 100.0 * sum(a == b for a, b in zip(p, r, strict=True)) / len(r)})


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    feats = torch.randn(n, 2, 8, generator=g) + torch.nn.functional.one_hot(labels, 8)[:, None, :] * 1.5
    return PooledFeatures(feats), labels


def _run(tmp, on_checkpoint=None, weighted: bool = False, max_steps: int = 60, batch_size: int = 8, runtime=None):
    """Train the toy head; ``weighted``: class-balanced training draws and dev resamples."""
    torch.manual_seed(0)
    model = DownstreamModel(WeightedLayerSum(2), UtteranceLevelHead(8, 16, 3))
    cfg = RunConfig(task="toy", train=TrainConfig(max_steps=max_steps, batch_size=batch_size, eval_every=10, seed=3))
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-2))
    train_src, train_y = _data(64, 1)
    dev_src, dev_y = _data(32, 2)
    weights = {}
    if weighted:
        weights = {"train_weights": [1.0 / (train_y == y).sum().item() for y in train_y.tolist()],
                   "dev_weights": [1.0 / (dev_y == y).sum().item() for y in dev_y.tolist()]}
    runtime = runtime or Runtime()
    state = train(model, _task(), cfg, train_src, train_y, [1.0] * 64, dev_src, dev_y.tolist(), tmp,
                  on_checkpoint=on_checkpoint, runtime=runtime, **weights)
    return model, state


def _assert_resumes_exactly(cut, model, state, **run_options) -> None:
    """A run interrupted after its checkpoint at step 20, then resumed, ends exactly as ``model``/``state``."""

    def stop_at_20(step):
        if step == 20:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(cut, on_checkpoint=stop_at_20, **run_options)
    resumed, resumed_state = _run(cut, **run_options)
    assert resumed_state.history == state.history
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_training_learns_and_keeps_best(tmp_path):
    model, state = _run(tmp_path)
    assert state.step == 60 and len(state.history) == 6
    assert state.best_dev == max(h["dev_accuracy"] for h in state.history) > 60.0
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists()


def test_interrupted_run_resumes_to_identical_result(tmp_path):
    full_model, full_state = _run(tmp_path / "full")

    def stop_at_30(step):
        if step == 30:
            raise Interrupt

    with pytest.raises(Interrupt):
        _run(tmp_path / "cut", on_checkpoint=stop_at_30)
    resumed_model, resumed_state = _run(tmp_path / "cut")
    assert (resumed_state.best_step, resumed_state.best_dev) == (full_state.best_step, full_state.best_dev)
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    best_full = torch.load(tmp_path / "full" / "best.pt", weights_only=True)
    best_cut = torch.load(tmp_path / "cut" / "best.pt", weights_only=True)
    assert all(torch.equal(best_full[k], best_cut[k]) for k in best_full)


def test_batch_schedule_is_a_function_of_seed_and_epoch():
    a = BatchSchedule([1.0] * 10, batch_size=4, seed=0, max_batch_s=None)
    b = BatchSchedule([1.0] * 10, batch_size=4, seed=0, max_batch_s=None)
    assert [a.micro_batch(i) for i in range(7)] == [b.micro_batch(i) for i in reversed(range(7))][::-1]
    assert sorted(i for k in range(3) for i in a.micro_batch(k)) == list(range(10))  # an epoch covers all
    assert a.epoch_batches(0) != a.epoch_batches(1)
    durations = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    frames = BatchSchedule(durations, batch_size=8, seed=0, max_batch_s=8.0)
    for batch in frames.epoch_batches(0):
        assert len(batch) * max(durations[i] for i in batch) <= 8.0 or len(batch) == 1


def test_evaluate_scores_every_utterance():
    src, y = _data(10, 5)
    model = DownstreamModel(WeightedLayerSum(2), UtteranceLevelHead(8, 4, 3))
    scores, predictions = evaluate(model, _task(), src, y.tolist(), batch_size=3)
    assert len(predictions) == 10 and 0.0 <= scores["accuracy"] <= 100.0


def test_class_balanced_draws_are_balanced_and_a_function_of_seed_and_step():
    labels = [0] * 70 + [1] * 25 + [2] * 5  # 70 / 25 / 5 %, like _unknown_ against the rare classes
    counts = Counter(labels)
    weights = [len(labels) / counts[y] for y in labels]  # s3prl's len(data) / class_count
    schedule = BatchSchedule([1.0] * 100, batch_size=8, seed=4, max_batch_s=None, weights=weights)
    assert all(len(b) == 8 for b in schedule.epoch_batches(0)) and len(schedule.epoch_batches(0)) == 12  # drop_last
    draws = Counter(labels[i] for k in range(3000) for i in schedule.micro_batch(k))
    assert sum(draws.values()) == 24000
    for y in (0, 1, 2):
        assert abs(draws[y] / 24000 - 1 / 3) < 0.01, draws
    # a resumed run rebuilds the schedule from scratch and asks for batch k directly: identical draws
    fresh = BatchSchedule([1.0] * 100, batch_size=8, seed=4, max_batch_s=None, weights=weights)
    assert [fresh.micro_batch(k) for k in (2999, 1500, 37)] == [schedule.micro_batch(k) for k in (2999, 1500, 37)]
    other_seed = BatchSchedule([1.0] * 100, batch_size=8, seed=5, max_batch_s=None, weights=weights)
    assert other_seed.micro_batch(0) != schedule.micro_batch(0)
    with pytest.raises(ValueError, match="non-negative"):
        BatchSchedule([1.0] * 3, batch_size=2, seed=0, max_batch_s=None, weights=[1.0, -1.0, 1.0])


def test_length_buckets_of_equal_durations_change_between_epochs():
    schedule = BatchSchedule([8.0] * 40, batch_size=10, seed=0, max_batch_s=80.0)  # e.g. ASV's 8 s crops
    first, second = (sorted(map(sorted, schedule.epoch_batches(e))) for e in (0, 1))
    assert first != second and sorted(i for b in first for i in b) == list(range(40))


def test_weighted_training_selects_on_a_resampled_dev_set_and_resumes_exactly(tmp_path):
    model, state = _run(tmp_path / "full", weighted=True, max_steps=40)
    assert [sorted(h) for h in state.history] == [["dev_accuracy", "dev_accuracy_all", "loss", "step"]] * 4
    assert state.best_dev == max(h["dev_accuracy"] for h in state.history)
    assert any(h["dev_accuracy"] != h["dev_accuracy_all"] for h in state.history)  # a resample, not the dev set

    _assert_resumes_exactly(tmp_path / "cut", model, state, weighted=True, max_steps=40)


def test_weighted_resample_is_seeded_by_seed_and_step():
    weights = [1.0, 1.0, 8.0]
    assert weighted_resample(weights, 0, 10) == weighted_resample(weights, 0, 10)
    assert weighted_resample(weights, 0, 10) != weighted_resample(weights, 0, 20)
    draws = Counter(i for step in range(200) for i in weighted_resample(weights, 1, step))
    assert abs(draws[2] / 600 - 0.8) < 0.05


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_learns_and_resumes_exactly(tmp_path, device, precision):
    """Autocast for the head (and a grad scaler, checkpointed, for fp16) on the device; resume stays exact.

    (Commands refuse fp16 on the CPU, for the upstreams' sake; the loop's scaler logic is the same on every device,
    so it is tested here on the CPU too.)"""
    runtime = Runtime(torch.device(device), precision)
    model, state = _run(tmp_path / "full", runtime=runtime, max_steps=40)
    assert next(model.parameters()).device.type == device
    assert state.best_dev > 60.0
    ckpt = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    assert ("scaler" in ckpt) == (precision == "fp16") and ("cuda_rng" in ckpt) == (device == "cuda")

    _assert_resumes_exactly(tmp_path / "cut", model, state, runtime=runtime, max_steps=40)
