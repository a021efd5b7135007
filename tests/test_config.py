import dataclasses

import pytest

from speechbench.benchmark.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    build_run_config,
    config_sha256,
    find_recipe,
    list_recipes,
    load_raw_recipe,
    parse_override,
)
from speechbench.downstreams.ks import KSOptions


def test_shipped_recipes_parse():
    names = list_recipes()
    assert "synth/ks" in names and "superb/ks" in names
    for name in ("synth/ks", "superb/ks"):
        cfg = build_run_config(load_raw_recipe(find_recipe(name)), KSOptions, name)
        assert isinstance(cfg, RunConfig) and cfg.task == "ks"
    superb = build_run_config(load_raw_recipe(find_recipe("superb/ks")), KSOptions, "superb/ks")
    assert (superb.train.max_steps, superb.train.batch_size, superb.optim.lr) == (200000, 32, 1e-4)


def test_unknown_key_lists_valid_ones():
    raw = load_raw_recipe(find_recipe("synth/ks"))
    raw["optim"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\]; valid keys: name, lr"):
        build_run_config(raw, KSOptions, "x.yaml")
    raw = load_raw_recipe(find_recipe("synth/ks"))
    raw["task_options"]["dims"] = 3
    with pytest.raises(ConfigError, match="task_options: unknown key.*valid keys: projector_dim, test_root"):
        build_run_config(raw, KSOptions, "x.yaml")


def test_overrides_are_typed():
    raw = load_raw_recipe(find_recipe("synth/ks"))
    raw = apply_overrides(raw, ["optim.lr=1e-2", "train.max_steps=10", "task_options.projector_dim=64",
                                "featurizer.layer_norm=true", "cache=off", "featurizer.layer=null"])
    cfg = build_run_config(raw, KSOptions, "x")
    assert cfg.optim.lr == 0.01 and isinstance(cfg.optim.lr, float)  # "1e-2" is a string to YAML 1.1
    assert cfg.train.max_steps == 10 and cfg.task_options.projector_dim == 64 and cfg.featurizer.layer_norm is True
    assert cfg.cache == "off" and cfg.featurizer.layer is None
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        build_run_config(apply_overrides(raw, ["train.max_steps=many"]), KSOptions, "x")
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_override("optim.lr")


def test_config_hash_changes_with_values():
    cfg = build_run_config(load_raw_recipe(find_recipe("synth/ks")), KSOptions, "x")
    other = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=0.5))
    assert config_sha256(cfg) == config_sha256(dataclasses.replace(cfg))
    assert config_sha256(cfg) != config_sha256(other)


def test_missing_recipe_lists_shipped_ones():
    with pytest.raises(ConfigError, match="shipped recipes: .*synth/ks"):
        find_recipe("synth/nope")


def test_yaml_cannot_build_objects(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: ks\noptim: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_raw_recipe(bad)
