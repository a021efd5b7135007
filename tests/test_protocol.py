"""The protocol fingerprint: recipe claims, overrides that change the protocol, task facts, superb_faithful."""

import dataclasses
from pathlib import Path

from speechbench.benchmark.config import load_raw_recipe
from speechbench.benchmark.protocol import override_deviations, protocol_record
from speechbench.benchmark.run import RunRequest, resolve_config
from speechbench.downstreams.data import Utterance
from speechbench.downstreams.ks import CLASSES, OFFICIAL_TEST_CLIPS
from speechbench.downstreams.tasks import PreparedData, get_task


def _configs(*overrides: str, task: str = "ks", recipe: str | None = None):
    req = RunRequest(upstream="fbank", task=task, data_root="/corpora/x", overrides=overrides, recipe=recipe)
    return resolve_config(req, get_task(task)), resolve_config(req, get_task(task), shipped=True)


def _prepared(n_test: int, corpus: str = "speech_commands_v0.01") -> PreparedData:
    test = [Utterance(f"t{k}", f"t{k}.wav", 1.0, "s", "test", {"keyword": "yes"}) for k in range(n_test)]
    return PreparedData(Path("."), {"train": [], "dev": [], "test": test}, corpus, CLASSES)


def test_overrides_that_change_the_protocol_are_deviations_and_the_others_are_not():
    cfg, shipped = _configs("train.max_steps=1000", "optim.lr=1e-3", "cache=off", "train.seed=3",
                            "task_options.test_root=/elsewhere", "featurizer.layer=0", "data.max_per_split=50")
    assert override_deviations(cfg, shipped) == [
        "data.max_per_split=50 (recipe superb/ks: None)", "featurizer.layer=0 (recipe superb/ks: None)",
        "train.max_steps=1000 (recipe superb/ks: 200000)"]
    assert override_deviations(*_configs()) == []
    # options the task judges itself (KS sampling) are left to its protocol hook, not reported twice
    assert override_deviations(*_configs("task_options.sampling=uniform")) == []


def test_superb_faithful_needs_a_superb_recipe_the_real_corpus_and_no_deviation():
    task = get_task("ks")
    cfg, shipped = _configs()
    record = protocol_record(cfg, shipped, task, _prepared(OFFICIAL_TEST_CLIPS), [1e-4])
    assert record["superb_faithful"] and record["deviations"] == [] and record["reproduces"] == "superb"
    assert (record["test_scored"], record["test_official"], record["sampling"]) == (3081, 3081, "class_balanced")
    assert record["lr_searched"] is False and record["lrs"] == [1e-4] and record["eval_every"] == 5000
    assert record["known_differences"][0].startswith("_silence_ for train and dev")
    searched = protocol_record(cfg, shipped, task, _prepared(OFFICIAL_TEST_CLIPS), [1e-3, 1e-4])
    assert searched["lr_searched"] and searched["superb_faithful"]

    short = protocol_record(cfg, shipped, task, _prepared(3000), [1e-4])
    assert not short["superb_faithful"] and short["deviations"] == ["scored 3000 of the 3081 official test items"]
    uniform = dataclasses.replace(cfg, task_options=dataclasses.replace(cfg.task_options, sampling="uniform"))
    record = protocol_record(uniform, shipped, task, _prepared(OFFICIAL_TEST_CLIPS), [1e-4])
    assert not record["superb_faithful"] and record["deviations"][0].startswith("uniform sampling")
    synth = protocol_record(cfg, shipped, task, _prepared(600, corpus="synth"), [1e-4])
    assert not synth["superb_faithful"] and synth["deviations"][0].startswith("synthetic corpus")
    not_superb = dataclasses.replace(cfg, protocol=dataclasses.replace(cfg.protocol, reproduces=""))
    assert not protocol_record(not_superb, shipped, task, _prepared(OFFICIAL_TEST_CLIPS), [1e-4])["superb_faithful"]


def test_shipped_superb_recipes_declare_their_claim():
    """Every superb/ recipe says which protocol it reproduces; one that declares deviations never calls itself the
    published SUPERB protocol, and ASV (dev-trial selection by default) does not either."""
    from speechbench.benchmark.config import find_recipe, list_recipes

    for name in [r for r in list_recipes() if r.startswith("superb/")]:
        raw = load_raw_recipe(find_recipe(name))
        protocol = raw.get("protocol", {})
        assert protocol.get("reproduces") == "superb", name
        published = "published SUPERB protocol" in raw["description"]
        assert published == (not protocol.get("deviations") and raw["task"] != "asv"), name
    pr_quick = load_raw_recipe(find_recipe("superb/pr_cmudict"))
    assert len(pr_quick["protocol"]["deviations"]) == 3 and "non-SUPERB" in pr_quick["description"]
