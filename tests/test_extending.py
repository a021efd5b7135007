"""docs/extending.md, checked by doing it: a toy model family with a card, a toy task and a recipe file, all
registered from this test, run end to end through the CLI.

The files the docs list for each extension map to what this test writes: the family's module (the loader and the
upstream class below, registered with ``@register_family``), its card (a YAML file in the cards folder), the task's
module (a ``Task`` registered with ``register_task``) and a recipe YAML.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speechbench.benchmark.cli import main
from speechbench.downstreams import tasks as task_registry
from speechbench.downstreams.data import read_manifest
from speechbench.downstreams.heads import UtteranceLevelHead
from speechbench.downstreams.metrics import accuracy_percent
from speechbench.downstreams.tasks import PreparedData, Task, register_task
from speechbench.upstreams import families, registry
from speechbench.upstreams.base import UpstreamOutput, freeze
from speechbench.upstreams.checkpoints import load_speechbench_checkpoint, save_speechbench_checkpoint
from speechbench.upstreams.families import register_family

FRAME = 320  # samples per frame: 20 ms at 16 kHz


class ToyUpstream(nn.Module):
    """Frames of 320 samples -> Linear -> [projection, tanh(projection)]: ``L = 2`` hidden states of size ``dim``."""

    sample_rate, num_layers, downsample_rate = 16000, 2, FRAME

    def __init__(self, dim: int, name: str, sha256: str | None):
        super().__init__()
        self.name, self.family, self.hidden_size = name, "toyfam", dim
        self.checkpoint_format, self.checkpoint_sha256, self.settings = "speechbench", sha256, {"dim": dim}
        self.proj = nn.Linear(FRAME, dim)
        freeze(self)

    def forward(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> UpstreamOutput:
        num_frames = max(1, wavs.shape[1] // FRAME)
        frames = F.pad(wavs, (0, num_frames * FRAME - wavs.shape[1]))[:, : num_frames * FRAME]
        x = self.proj(frames.reshape(wavs.shape[0], num_frames, FRAME))
        lengths = (wav_lengths // FRAME).clamp(min=1)
        mask = (torch.arange(num_frames)[None, :] < lengths[:, None]).unsqueeze(-1)
        hidden = torch.stack([x, torch.tanh(x)], dim=1) * mask.unsqueeze(1)
        return UpstreamOutput(hidden, lengths)


def load_toy(detected, name: str) -> ToyUpstream:
    config, state = load_speechbench_checkpoint(detected.path)
    upstream = ToyUpstream(config["dim"], name, detected.sha256)
    upstream.proj.load_state_dict({k.removeprefix("proj."): v for k, v in state.items()})
    return freeze(upstream)


DIRECTIONS = {"up", "down", "left", "right"}


@dataclass(frozen=True)
class ToyOptions:  # the recipe's task_options section
    projector_dim: int = 32


def _prepare(data_cfg, options) -> PreparedData:
    """Toy task: is the keyword a direction word? On the synthetic KS manifests."""
    from speechbench.downstreams.synth.corpus import ensure_corpus

    corpus = ensure_corpus(data_cfg.profile, data_cfg.synth_seed, progress=False)
    splits = {s: read_manifest(corpus / "ks" / f"{s}.jsonl") for s in ("train", "dev", "test")}
    return PreparedData(corpus, splits, "synth", ("other", "direction"), {"profile": data_cfg.profile})


def _label(u) -> str:
    return "direction" if u.labels["keyword"] in DIRECTIONS else "other"


@pytest.fixture
def toy_extensions(monkeypatch, tmp_path):
    """Register the toy family, its card (with its checkpoint bundled in a temporary folder) and the toy task."""
    families.list_families()  # the built-in families first, so the copy below holds them
    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))  # the toy family is gone after the test
    register_family("toyfam", "Toy", "framewise linear projection (a test family)")(load_toy)

    checkpoint = tmp_path / "bundled" / "toy-ckpt"
    torch.manual_seed(0)
    save_speechbench_checkpoint(checkpoint, "toyfam", {"dim": 16},
                                {f"proj.{k}": v for k, v in nn.Linear(FRAME, 16).state_dict().items()})
    cards = tmp_path / "cards"
    cards.mkdir()
    for card in registry.CARDS_DIR.glob("*.yaml"):
        (cards / card.name).write_text(card.read_text())
    (cards / "toy-card.yaml").write_text("name: toy-card\nfamily: toyfam\ndescription: a toy checkpoint\n"
                                         "source: bundled:toy-ckpt\nlicense: CC0\n")
    monkeypatch.setattr(registry, "CARDS_DIR", cards)
    monkeypatch.setattr(registry, "BUNDLED_DIR", tmp_path / "bundled")
    registry.load_cards.cache_clear()

    task_registry.list_tasks()
    monkeypatch.setattr(task_registry, "TASKS", dict(task_registry.TASKS))
    register_task(Task(
        name="toydir", metric="accuracy", unit="%", higher_is_better=True, granularity="pooled",
        options_cls=ToyOptions,
        prepare=_prepare,
        targets=lambda utts, prepared: torch.tensor([prepared.label_space.index(_label(u)) for u in utts]),
        build_head=lambda dim, prepared, options: UtteranceLevelHead(dim, options.projector_dim, 2),
        loss=F.cross_entropy,
        predict=lambda logits, lengths: [("other", "direction")[i] for i in logits.argmax(-1).tolist()],
        references=lambda utts, prepared: [_label(u) for u in utts],
        score=lambda predictions, refs: {"accuracy": accuracy_percent(predictions, refs)},
        summary="toy: is the keyword a direction word", real_corpus="none"))
    yield tmp_path
    registry.load_cards.cache_clear()


RECIPE = """\
task: toydir
description: "toy task on the tiny synthetic corpus"
data:
  corpus: synth
  profile: tiny
optim:
  lr: 1.0e-2
train:
  max_steps: 60
  eval_every: 20
task_options:
  projector_dim: 32
"""


def test_toy_family_card_task_and_recipe_run_end_to_end(toy_extensions, synth_tiny, capsys):
    tmp = toy_extensions
    recipe = tmp / "toydir.yaml"
    recipe.write_text(RECIPE)

    assert main(["list", "families", "--json"]) == 0
    listed = {f["name"]: f for f in json.loads(capsys.readouterr().out)}
    assert {"apc", "cpc", "wav2vec2", "hubert", "toyfam"} <= set(listed) and not listed["toyfam"]["pretrain"]
    assert main(["list", "upstreams"]) == 0
    assert "toy-card" in capsys.readouterr().out
    assert main(["list", "tasks", "--json"]) == 0
    assert "toydir" in {t["name"] for t in json.loads(capsys.readouterr().out)}

    assert main(["check-upstream", "toy-card", "--seconds", "3"]) == 0
    assert "PASS" in capsys.readouterr().out

    assert main(["run", "--upstream", "toy-card", "--task", "toydir", "--recipe", str(recipe),
                 "--out", str(tmp / "results"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["task"] == "toydir" and row["steps"] == 60 and 0.0 <= row["value"] <= 100.0
    assert row["upstream"]["family"] == "toyfam" and row["upstream"]["num_layers"] == 2
    assert row["upstream"]["checkpoint_format"] == "speechbench" and len(row["upstream"]["checkpoint_sha256"]) == 64
    assert len(row["layer_weights"]) == 2 and row["recipe"]["name"] == str(recipe)
    written = json.loads(next(Path(tmp / "results" / "toy-card" / "toydir").rglob("result.json")).read_text())
    assert written["value"] == row["value"]

    # the family's checkpoint folder works as a path upstream too (format detected through the family registry)
    assert main(["check-upstream", str(tmp / "bundled" / "toy-ckpt"), "--seconds", "3"]) == 0
