"""The protocol fingerprint of a run: the facts that decide whether its number is comparable to SUPERB's.

Every ``result.json`` gets a ``protocol`` section (schema 3)::

    {"recipe": "superb/ks", "reproduces": "superb", "superb_faithful": true, "deviations": [],
     "known_differences": [...], "lr_searched": false, "lrs": [0.0001], "test_scored": 3081, "test_official": 3081,
     "sampling": "class_balanced", ...}

``deviations`` collects, in this order: the recipe's declared ``protocol.deviations``; a synthetic corpus; every
override of a recipe field that changes the protocol (``train.max_steps=1000 (recipe: 200000)``; fields that do
not change the number, such as paths, the cache mode, the learning rate, which is searched, the seed and the
device, are not deviations); a precision other than fp32 (bf16/fp16 autocast moves every hidden state by about 1 %);
the task's run-time findings (a dropped test utterance, a different phone set or trial list ...); where a Hugging Face
dataset's layout differs from the corpus' (``hf_dataset`` then records the dataset, the splits and columns read and
notes on its layout); a test set smaller than the official one. ``superb_faithful`` is true only for a recipe that
reproduces SUPERB (``protocol.reproduces: superb``) on the real corpus with no deviation at all; the leaderboard's
SUPERB score uses only those rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from speechbench.benchmark.config import RunConfig, config_to_dict
from speechbench.downstreams.tasks import PreparedData, Task

# Recipe fields whose value never changes the number (where the data lives, how features are cached, logging,
# evaluation batch size, the learning rate -- searched, recorded separately -- the seed, and the device), or that
# protocol_record judges itself (the precision).
NEUTRAL_FIELDS = frozenset({
    "recipe", "description", "cache", "cache_budget_gb", "data.root", "train.log_every", "train.eval_batch_size",
    "optim.lr", "train.seed", "runtime.device", "runtime.precision",
})
# A task option declared with ``dataclasses.field(metadata={"protocol": "neutral"})`` never changes the number (a
# path, the fold); one with ``{"protocol": "task"}`` is judged by the task's own protocol hook (KS sampling, the PR
# lexicon, the ASV trial list ...). Neither is reported as an override.
PROTOCOL_MARKS = ("neutral", "task")


def neutral_option_fields(options_cls: type) -> set[str]:
    """``task_options.<name>`` of every task option marked ``neutral`` or ``task`` (see :data:`PROTOCOL_MARKS`)."""
    return {f"task_options.{f.name}" for f in dataclasses.fields(options_cls)
            if f.metadata.get("protocol") in PROTOCOL_MARKS}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def override_deviations(cfg: RunConfig, shipped: RunConfig) -> list[str]:
    """``field=value (recipe <name>: value)`` for every protocol-relevant field where ``cfg`` differs from the
    recipe as shipped (the ``protocol`` section itself is the recipe's claim, not a setting)."""
    neutral = NEUTRAL_FIELDS | neutral_option_fields(type(cfg.task_options))
    ours, theirs = _flatten(config_to_dict(cfg)), _flatten(config_to_dict(shipped))
    return [f"{key}={ours.get(key)!r} (recipe {shipped.recipe}: {theirs.get(key)!r})"
            for key in sorted(set(ours) | set(theirs))
            if not _under(key, neutral) and not key.startswith("protocol.") and ours.get(key) != theirs.get(key)]


def _under(key: str, fields: set[str]) -> bool:
    """``key`` is one of ``fields`` or an entry of one (``task_options.columns.label`` of ``task_options.columns``)."""
    return key in fields or any(key.startswith(f"{f}.") for f in fields)


def protocol_record(cfg: RunConfig, shipped: RunConfig, task: Task, prepared: PreparedData,
                    lrs: list[float]) -> dict:
    """The ``protocol`` section of a result (module docstring)."""
    deviations = list(cfg.protocol.deviations)
    if prepared.corpus == "synth":
        deviations.append("synthetic corpus: a smoke benchmark, not the task's SUPERB dataset")
    deviations += [f"override {d}" for d in override_deviations(cfg, shipped)]
    if cfg.runtime.precision != "fp32":
        deviations.append(f"precision {cfg.runtime.precision}: upstream features and head computed under "
                          f"torch.autocast (SUPERB's published numbers are fp32)")
    facts, task_deviations = task.protocol(prepared, cfg.task_options) if task.protocol else ({}, [])
    facts = {"test_scored": len(prepared.splits["test"]), **facts}
    deviations += task_deviations
    hf = prepared.info.get("hf")
    if hf:  # a Hugging Face dataset: which splits and columns were read, and how its layout differs from the corpus'
        facts["hf_dataset"] = {k: hf[k] for k in ("dataset", "splits", "columns", "fingerprints", "notes")}
        deviations += [f"Hugging Face dataset layout: {d}" for d in hf["deviations"]]
    scored, official = facts.get("test_scored"), facts.get("test_official")
    if scored is not None and official is not None and scored != official:
        deviations.append(f"scored {scored} of the {official} official test items")
    faithful = cfg.protocol.reproduces == "superb" and prepared.corpus != "synth" and not deviations
    return {"recipe": cfg.recipe, "reproduces": cfg.protocol.reproduces or None, "superb_faithful": faithful,
            "deviations": deviations, "known_differences": list(cfg.protocol.known_differences),
            "lr_searched": len(lrs) > 1, "lrs": [float(lr) for lr in lrs], "eval_every": cfg.train.eval_every,
            "max_steps": cfg.train.max_steps, "precision": cfg.runtime.precision, **facts}
