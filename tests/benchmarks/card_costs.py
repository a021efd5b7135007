"""Parameters and GFLOPs per audio second of every card's architecture: the ``params_m`` and ``gflops_per_s`` card
fields (run by hand, not by pytest; ``tests/test_card_costs.py`` checks the cards against it).

    python tests/benchmarks/card_costs.py           # print the table
    python tests/benchmarks/card_costs.py --check   # exit 1 when a card's fields differ from the computed values
    python tests/benchmarks/card_costs.py --write   # set the two fields in every card (after benchmark/bundle.py)

How the numbers are made, for every card alike:

- the architecture of the published size is built with random weights on torch's ``meta`` device (shapes only: no
  memory, no arithmetic; APC and CPC, whose RNNs run step by step, on the CPU, where that is faster), from the
  configs below (HF families: the published ``config.json`` values; APC, CPC and
  DistilHuBERT: our modules with the published settings; bundled cards: their shipped ``config.json``);
- parameters: those of the model the upstream runs (transformers' ``masked_spec_embed``, used only for training-time
  masking, left out; pre-training heads outside that model, such as wav2vec 2.0's quantiser, are not in it). APC's
  ``postnet`` counts (its forward runs it, as s3prl's does), and so do DistilHuBERT's prediction heads, whose outputs
  are among its hidden states;
- FLOPs: :func:`speechbench.benchmark.cost.count_flops` (``torch.utils.flop_counter.FlopCounterMode`` plus formulas
  for recurrent layers and the CPU attention kernel; the counter behind every result's ``cost``) over the forward of
  one 10-second input at 16 kHz, divided by 10. It counts matrix multiplications, convolutions, recurrent layers and
  attention (2 FLOPs per multiply-add), not element-wise operations, norms or softmax. The attention share grows
  with the input length, so the figure is for 10 s inputs.

Both are rounded to 3 significant digits.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from speechbench.benchmark.cost import count_flops

SECONDS = 10.0
LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
LARGE_LN = dict(LARGE, feat_extract_norm="layer", do_stable_layer_norm=True)
# the published sizes (their config.json on the HF hub; transformers' defaults are the Base models)
HF_ARCHITECTURES = {
    "wav2vec2": ("wav2vec2", {}),  # facebook/wav2vec2-base
    "wav2vec2_large": ("wav2vec2", dict(LARGE_LN, conv_bias=True)),  # facebook/wav2vec2-large-lv60
    "hubert": ("hubert", {}),  # facebook/hubert-base-ls960
    "hubert_large": ("hubert", dict(LARGE_LN, conv_bias=True)),  # facebook/hubert-large-ll60k
    "wavlm_base": ("wavlm", {}),  # microsoft/wavlm-base
    "wavlm_base_plus": ("wavlm", {}),  # microsoft/wavlm-base-plus: Base's architecture, more data
    "wavlm_large": ("wavlm", LARGE_LN),  # microsoft/wavlm-large
    "data2vec_base": ("data2vec_audio", {}),  # facebook/data2vec-audio-base
    "data2vec_large": ("data2vec_audio", LARGE),  # facebook/data2vec-audio-large
}
PRETRAINING_ONLY = ("masked_spec_embed",)
CPU_FAMILIES = ("apc", "cpc")  # RNNs: one op per time step, slow to trace on the meta device


@dataclass(frozen=True)
class Cost:
    params_m: float  # millions of parameters
    gflops_per_s: float  # GFLOPs per second of 16 kHz audio (10 s input)


def _hf_model(family: str, config: dict) -> tuple[nn.Module, Callable[[int], tuple]]:
    import transformers

    from speechbench.upstreams.hf import model_class

    cls = model_class(family)
    config_cls = getattr(transformers, cls.__name__.replace("Model", "Config"))
    model = cls(config_cls(**{**config, "mask_time_prob": 0.0, "mask_feature_prob": 0.0}))
    model.set_attn_implementation("eager")
    for module in model.modules():  # weight norm's parametrization cannot run on meta tensors in inference mode
        if parametrize.is_parametrized(module):
            for tensor_name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return model, lambda samples: (torch.zeros(1, samples),)


def architecture(name: str) -> tuple[nn.Module, Callable[[int], tuple]]:
    """The model of a card's architecture (built on the current default device) and its inputs for ``samples``
    samples of audio."""
    from speechbench.upstreams.apc import APC, APCConfig
    from speechbench.upstreams.cpc import CPCConfig, CPCModel
    from speechbench.upstreams.distilhubert import DistilHuBERT, DistilHuBERTConfig
    from speechbench.upstreams.registry import BUNDLED_DIR, load_cards

    card = load_cards()[name]
    if name in HF_ARCHITECTURES:
        return _hf_model(*HF_ARCHITECTURES[name])
    config = None
    if card.source.startswith("bundled:"):
        config = json.loads((BUNDLED_DIR / card.source[len("bundled:"):] / "config.json").read_text())
        if card.family not in ("apc", "cpc", "distilhubert"):
            return _hf_model(card.family, {k: v for k, v in config.items() if k not in ("architectures",)})
    if card.family == "apc":
        apc = APC(APCConfig.from_dict(config) if config else APCConfig())
        frames = lambda samples: 1 + (samples - 400) // 160  # noqa: E731  (25 ms / 10 ms Kaldi frames)
        return apc, lambda samples: (torch.zeros(1, frames(samples), apc.config.input_size),)
    if card.family == "cpc":
        return CPCModel(CPCConfig.from_dict(config) if config else CPCConfig()), \
            lambda samples: (torch.zeros(1, 1, samples),)
    if card.family == "distilhubert":
        model = DistilHuBERT(DistilHuBERTConfig.from_dict(config) if config else DistilHuBERTConfig())
        return model, lambda samples: (torch.zeros(1, samples),)
    raise KeyError(f"no architecture for card {name}")


def card_cost(name: str, seconds: float = SECONDS) -> Cost:
    """Parameters and GFLOPs per audio second of a card's architecture (see the module docstring)."""
    from speechbench.upstreams.registry import load_cards

    with torch.device("cpu" if load_cards()[name].family in CPU_FAMILIES else "meta"):
        model, inputs = architecture(name)
        model.eval()
        params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(PRETRAINING_ONLY))
        flops = count_flops(lambda: model(*inputs(round(seconds * 16000))))
    return Cost(float(f"{params / 1e6:.3g}"), float(f"{flops / seconds / 1e9:.3g}"))


def write_cost(path: Path, cost: Cost) -> None:
    """Set ``params_m`` and ``gflops_per_s`` in a card file, in place (after ``reference``/``sha256``), keeping every
    other line as it is."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith(("params_m:", "gflops_per_s:"))]
    at = 1 + max(i for i, line in enumerate(lines) if line.startswith(("reference:", "sha256:", "source:")))
    lines[at:at] = [f"params_m: {cost.params_m:g}", f"gflops_per_s: {cost.gflops_per_s:g}"]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from speechbench.upstreams.registry import CARDS_DIR, load_cards

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a card differs from the computed values")
    parser.add_argument("--write", action="store_true", help="write the computed values into the cards")
    args = parser.parse_args(argv)
    bad = []
    print(f"{'card':<22} {'params (M)':>10} {'GFLOPs/s':>9}   card says")
    for name, card in sorted(load_cards().items()):
        cost = card_cost(name)
        said = (card.params_m, card.gflops_per_s)
        ok = said == (cost.params_m, cost.gflops_per_s)
        bad += [] if ok else [name]
        print(f"{name:<22} {cost.params_m:>10g} {cost.gflops_per_s:>9g}   {'ok' if ok else said}")
        if args.write and not ok:
            write_cost(CARDS_DIR / f"{name}.yaml", cost)
    if args.check and bad:
        print(f"cards that differ: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
