"""Card cost fields (``params_m``, ``gflops_per_s``): validated on read, shown by ``bench list upstreams``, and equal
to what ``tests/benchmarks/card_costs.py`` computes from each architecture."""

import json

import pytest
from benchmarks.card_costs import card_cost, main

from speechbench.benchmark.cli import main as bench
from speechbench.upstreams.checkpoints import CheckpointError
from speechbench.upstreams.registry import _read_card, load_cards

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # APC's GRU runs step by step on the CPU


@pytest.mark.parametrize("name", ["distilhubert", "wavlm_base", "data2vec_large", "apc-synth", "hubert-synth"])
def test_card_costs_equal_the_computed_ones(name):
    card, cost = load_cards()[name], card_cost(name)
    assert (card.params_m, card.gflops_per_s) == (cost.params_m, cost.gflops_per_s)


@pytest.mark.slow
def test_every_card_has_its_computed_cost(capsys):
    assert main(["--check"]) == 0, capsys.readouterr().out


def test_hand_counted_costs():
    """APC: 3 GRU layers (80 -> 512 -> 512 -> 512) and the Linear(512, 80) postnet its forward runs, 998 frames in
    10 s, 2 FLOPs per multiply-add of the matmuls; DistilHuBERT: 23.49 M (the paper's count) plus its 3 heads."""
    gru = 3 * (80 * 512 + 512 * 512 + 2 * 512) + 2 * 3 * (2 * 512 * 512 + 2 * 512)
    apc = card_cost("apc")
    assert apc.params_m == float(f"{(gru + 512 * 80 + 80) / 1e6:.3g}") == 4.11  # SUPERB's table: 4.11 M
    macs_per_frame = sum(3 * (i * 512 + 512 * 512) for i in (80, 512, 512)) + 512 * 80
    assert apc.gflops_per_s == float(f"{2 * macs_per_frame * 998 / 10 / 1e9:.3g}")
    heads = 768 * 3 * 768 + 3 * 768 + 3 * 768 * 768 + 3 * 768
    assert card_cost("distilhubert").params_m == float(f"{(23_490_048 + heads) / 1e6:.3g}") == 27.0


def test_cost_fields_are_listed_and_validated(tmp_path, capsys):
    assert bench(["list", "upstreams", "--json"]) == 0
    items = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert (items["wavlm_large"]["params_m"], items["wavlm_large"]["gflops_per_s"]) == (315.0, 38.4)
    assert items["fbank"]["params_m"] is None
    assert bench(["list", "upstreams"]) == 0
    assert "27 M params, 7.34 GFLOPs per audio second" in capsys.readouterr().out
    bad = tmp_path / "mine.yaml"
    bad.write_text("name: mine\nfamily: wavlm\ndescription: x\nsource: hf:org/mine\nparams_m: lots\n")
    with pytest.raises(CheckpointError, match=r"\['params_m'\] must be non-negative numbers"):
        _read_card(bad)
