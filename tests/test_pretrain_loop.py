"""The generic pretraining loop and ``bench pretrain``: batches, resume, checkpoints, and a short run per family."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from speechbench.benchmark.cli import main
from speechbench.benchmark.pretrain import resolve_pretrain_config
from speechbench.upstreams.checkpoints import CheckpointError
from speechbench.upstreams.families import pretrain_families
from speechbench.upstreams.pretrain.base import get_objective
from speechbench.upstreams.pretrain.loop import (
    AudioSource,
    PretrainOptim,
    PretrainTrain,
    draw_batch,
    lr_factor,
    pretrain,
)
from speechbench.upstreams.registry import build_upstream

# tiny sizes so that a run takes seconds; the architecture stays the family's
SMALL = {
    "apc": ["model.hidden_size=32", "model.num_layers=2"],
    "cpc": ["model.hidden_encoder=32", "model.hidden_gar=32", "objective.prediction_steps=4",
            "objective.num_negatives=16"],
    "wav2vec2": ["model.hidden_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2",
                 "model.intermediate_size=64", "model.conv_dim=32,32,32,32,32,32,32", "model.codevector_dim=32",
                 "model.proj_codevector_dim=32", "model.num_codevectors_per_group=16"],
    "hubert": ["model.hidden_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2",
               "model.intermediate_size=64", "model.conv_dim=32,32,32,32,32,32,32", "objective.num_clusters=8",
               "objective.final_dim=16"],
}
RUN = ["data.profile=tiny", "train.batch_size=4", "train.crop_s=1.0", "train.log_every=1", "train.save_every=10",
       "train.prepare_batches=4", "optim.warmup_steps=2", "optim.schedule=constant"]


def _fake_source(lengths_s, calls=None, fail_after=None):
    def load(path):
        if calls is not None:
            calls.append(path)
            if fail_after is not None and len(calls) > fail_after:
                raise KeyboardInterrupt
        seconds = float(path)
        t = np.arange(int(16000 * seconds)) / 16000
        return (0.1 * np.sin(2 * np.pi * (200 + 50 * seconds) * t)).astype(np.float32)

    return AudioSource([str(s) for s in lengths_s], [int(16000 * s) for s in lengths_s], load)


def test_batches_are_reproducible_similar_in_length_and_unpadded():
    source = _fake_source([1.0] * 40 + [3.0] * 40)
    a = draw_batch(source, np.random.default_rng([0, 7]), 8, 2.0)
    b = draw_batch(source, np.random.default_rng([0, 7]), 8, 2.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    crops = {draw_batch(source, np.random.default_rng([0, i]), 8, 2.0)[0].shape[1] for i in range(40)}
    assert crops == {16000, 32000}  # 1 s words and 2 s crops of the 3 s sentences, never mixed into 1 s only
    wavs, lengths = a
    assert lengths.tolist() == [wavs.shape[1]] * 8


def test_lr_schedule_warms_up_then_decays_to_zero():
    optim = PretrainOptim(warmup_steps=10, schedule="linear")
    assert lr_factor(0, optim, 110) == pytest.approx(0.1) and lr_factor(9, optim, 110) == 1.0
    assert lr_factor(60, optim, 110) == pytest.approx(0.5) and lr_factor(110, optim, 110) == 0.0
    assert lr_factor(60, PretrainOptim(warmup_steps=10, schedule="cosine"), 110) == pytest.approx(0.5)


def _apc(seed=0):
    entry = get_objective("apc")
    model = entry.model_options(hidden_size=16, num_layers=1)
    return entry.build(model, entry.objective_options(), seed)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, one_torch_thread):
    optim, train = PretrainOptim(warmup_steps=2), PretrainTrain(max_steps=8, batch_size=2, crop_s=0.5, save_every=3,
                                                                log_every=1)
    source = _fake_source([0.5, 0.7, 0.9, 1.1])
    whole = _apc()
    pretrain(whole, source, optim, train, tmp_path / "whole", {"c": 1}, {}, progress=False)
    calls = []
    with pytest.raises(KeyboardInterrupt):  # dies while loading the batch of step 8 (after the step-6 checkpoint)
        pretrain(_apc(), _fake_source([0.5, 0.7, 0.9, 1.1], calls, fail_after=15), optim, train, tmp_path / "cut",
                 {"c": 1}, {}, progress=False)
    assert json.loads((tmp_path / "cut" / "upstream" / "speechbench.json").read_text())["step"] == 6
    resumed = _apc(seed=1)  # different initial weights: everything must come from the checkpoint
    summary = pretrain(resumed, source, optim, train, tmp_path / "cut", {"c": 1}, {}, progress=False)
    assert summary.resumed_from == 6 and summary.steps == 8
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # lines after the checkpoint were dropped and written again, once
    with pytest.raises(CheckpointError, match="different configuration"):
        pretrain(_apc(), source, optim, train, tmp_path / "cut", {"c": 2}, {}, progress=False)


def test_zero_steps_exports_the_random_initialisation(tmp_path, one_torch_thread):
    objective = _apc(seed=3)
    pretrain(objective, _fake_source([1.0]), PretrainOptim(), PretrainTrain(max_steps=0), tmp_path, {}, {"x": 1},
             progress=False)
    upstream = build_upstream(str(tmp_path / "upstream"))
    meta = json.loads((tmp_path / "upstream" / "speechbench.json").read_text())
    assert meta["step"] == 0 and meta["x"] == 1
    for key, value in objective.model.state_dict().items():
        assert torch.equal(value, upstream.model.state_dict()[key])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["apc", "cpc", "wav2vec2", "hubert"])
def test_short_run_on_the_tiny_corpus_lowers_the_loss_and_loads(family, tmp_path, synth_tiny, capsys,
                                                                 one_torch_thread):
    out = tmp_path / family
    steps = 100 if family == "wav2vec2" else 40  # contrastive targets need a few more updates to become predictable
    assert main(["pretrain", "--model", family, "--out", str(out), f"train.max_steps={steps}", "optim.lr=2e-3",
                 *RUN, *SMALL[family]]) == 0
    assert f"step {steps}" in capsys.readouterr().out
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == steps
    assert np.mean(losses[-8:]) < 0.95 * np.mean(losses[:8]), losses
    assert main(["check-upstream", str(out / "upstream"), "--seconds", "3"]) == 0
    meta = json.loads((out / "upstream" / "speechbench.json").read_text())
    assert meta["family"] == family and meta["step"] == steps
    assert meta["pretraining"]["recipe"] == f"pretrain/{family}" and "--model" in meta["pretraining"]["command"]


def test_hubert_second_iteration_from_the_first(tmp_path, synth_tiny, one_torch_thread, capsys):
    first, second = tmp_path / "it1", tmp_path / "it2"
    args = [*RUN, *SMALL["hubert"], "train.max_steps=3"]
    assert main(["pretrain", "--model", "hubert", "--out", str(first), *args]) == 0
    assert main(["pretrain", "--model", "hubert", "--iteration", "2", "--out", str(second), *args]) == 2
    assert "--from" in capsys.readouterr().err
    assert main(["pretrain", "--model", "hubert", "--iteration", "2", "--from", str(first / "upstream"), "--out",
                 str(second), *args]) == 0
    config = json.loads((second / "pretrain.json").read_text())
    assert config["objective"]["iteration"] == 2 and config["objective"]["teacher"] == str(first / "upstream")
    assert build_upstream(str(second / "upstream")).num_layers == 2


def test_pretrained_upstream_runs_in_bench_run(tmp_path, synth_tiny, one_torch_thread, capsys):
    out = tmp_path / "apc"
    assert main(["pretrain", "--model", "apc", "--out", str(out), "train.max_steps=2", *RUN, *SMALL["apc"]]) == 0
    assert main(["run", "--upstream", str(out / "upstream"), "--task", "ks", "--out", str(tmp_path / "results"),
                 "data.profile=tiny", "train.max_steps=5", "train.eval_every=5"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_recipe_errors_name_the_key(capsys):
    with pytest.raises(Exception, match="valid keys: .*hidden_size"):
        resolve_pretrain_config("apc", overrides=("model.hidden=3",))
    assert main(["pretrain", "--model", "apc", "--out", "/nonexistent/x", "train.crop_s=0"]) == 2
    assert "crop_s > 0" in capsys.readouterr().err


def test_shipped_recipes_parse():
    assert pretrain_families() == ("apc", "cpc", "hubert", "wav2vec2")
    for family in pretrain_families():
        cfg, name = resolve_pretrain_config(family)
        assert cfg.family == family and name == f"pretrain/{family}"
    cfg, _ = resolve_pretrain_config("hubert", "pretrain/hubert_iter2")
    assert cfg.objective.iteration == 2 and cfg.objective.num_clusters == 100


def test_bundled_upstreams_load_and_match_their_cards():
    from speechbench.common import sha256_file
    from speechbench.upstreams.registry import BUNDLED_DIR, load_cards

    cards = {name: card for name, card in load_cards().items() if card.source.startswith("bundled:")}
    expected = {f"{f}-synth{s}" for f in pretrain_families() for s in ("", "-random")}
    # an assertion, not a skip: a missing bundled upstream is a packaging break (the README's main job uses one)
    assert expected <= set(cards), f"bundled upstreams missing: {sorted(expected - set(cards))}"
    layers = {"apc": 3, "cpc": 2, "wav2vec2": 4, "hubert": 4}
    for name in sorted(expected):
        card = cards[name]
        assert card.command.startswith("bench pretrain --model") and card.recipe.startswith("pretrain/")
        assert sha256_file(Path(BUNDLED_DIR / name / "model.safetensors")) == card.sha256
        upstream = build_upstream(name)
        assert upstream.num_layers == layers[card.family]
        with torch.inference_mode():
            out = upstream(torch.randn(2, 16000) * 0.1, torch.tensor([16000, 12000]))
        assert torch.isfinite(out.hidden).all()
        assert ("max_steps=0" in card.command) == name.endswith("-random")
