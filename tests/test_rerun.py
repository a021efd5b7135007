"""`bench rerun result.json`: the recorded configuration again, refused when the checkpoint or config changed."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from helpers import error_line

from speechbench.benchmark.cli import main
from speechbench.benchmark.rerun import RerunError, rerun_request

TINY = ["data.profile=tiny", "train.max_steps=4", "train.eval_every=2", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, synth_tiny):
    """One tiny KS run of apc-synth (seed 2, so not the recipe's default), as bench run writes it."""
    out = tmp_path_factory.mktemp("rerun") / "results"
    assert main(["run", "--upstream", "apc-synth", "--task", "ks", "--seed", "2", "--out", str(out), *TINY]) == 0
    (path,) = (out / "apc-synth" / "ks").glob("*/result.json")
    return path


def test_rerun_reproduces_the_run_inside_its_interval(tiny_run, capsys):
    original = json.loads(tiny_run.read_text())
    assert main(["rerun", str(tiny_run), "--json", "--resamples", "200", "--device", "cpu"]) == 0
    outcome = json.loads(capsys.readouterr().out)
    new_dir = tiny_run.parent.with_name(tiny_run.parent.name + "-r2")
    assert outcome["new"] == str(new_dir / "result.json") and (new_dir / "items.jsonl").is_file()
    new = json.loads((new_dir / "result.json").read_text())
    # the same configuration: recipe + overrides (config sha), seed, learning rate, upstream; CPU training is
    # deterministic, so the same value
    assert new["recipe"] == original["recipe"] and (new["seed"], new["learning_rate"]) == (2, 3e-3)
    assert new["upstream"]["checkpoint_sha256"] == original["upstream"]["checkpoint_sha256"]
    assert new["value"] == original["value"] == outcome["original_value"] == outcome["new_value"]
    assert new["runtime"]["device"] == "cpu" and new["runtime"]["precision"] == "fp32"
    assert yaml.safe_load(new_dir.joinpath("config.yaml").read_text())["runtime"]["device"] == "cpu"
    lo, hi = outcome["interval"]
    assert lo <= new["value"] <= hi and outcome["inside"] is True


def test_rerun_prints_the_check(tiny_run, capsys, monkeypatch):
    """The text output, without training again: the run itself is replaced by the recorded row."""
    from speechbench.benchmark import rerun as rerun_module

    original = json.loads(tiny_run.read_text())
    monkeypatch.setattr(rerun_module, "run", lambda req, config: [{**original, "value": 101.0}])
    assert main(["rerun", str(tiny_run.parent), "--resamples", "200"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"rerun of {tiny_run} -> {tiny_run.parent.with_name(tiny_run.parent.name + '-r3')}/result.json"
    assert out[1].startswith(f"ks accuracy: new 101.00 %, original {original['value']:.2f} % (95% interval [")
    assert out[1].endswith("]): OUTSIDE the original's interval")


def test_rerun_refuses_a_changed_checkpoint(tiny_run, tmp_path, capsys):
    copy = tmp_path / "results" / "apc-synth" / "ks" / tiny_run.parent.name
    shutil.copytree(tiny_run.parent, copy)
    result = json.loads((copy / "result.json").read_text())
    result["upstream"]["checkpoint_sha256"] = "0" * 64
    (copy / "result.json").write_text(json.dumps(result))
    assert main(["rerun", str(copy / "result.json")]) == 2
    err = error_line(capsys.readouterr().err)
    assert "checkpoint sha256 is now" in err and "the recorded run used 0000000000000000..." in err
    assert not list(copy.parent.glob("*-r2"))  # refused before anything was written


def test_rerun_refuses_an_edited_config_or_missing_files(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run.parent, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["train"]["max_steps"] = 5
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(RerunError, match="config sha256 .* is not the .* that .* records"):
        rerun_request(copy / "result.json")
    (copy / "config.yaml").unlink()
    with pytest.raises(RerunError, match="config.yaml: missing"):
        rerun_request(copy)
    with pytest.raises(RerunError, match="no such result.json"):
        rerun_request(tmp_path / "nowhere" / "result.json")


def test_rerun_request_for_checkpoint_paths(tiny_run, tmp_path):
    """``--upstream PATH`` reruns from the recorded path; ``--upstream FAMILY --ckpt PATH`` (recorded as
    ``FAMILY@<file>``) reruns with the family and the checkpoint."""
    copy = tmp_path / "results" / "x" / "ks" / "run"
    shutil.copytree(tiny_run.parent, copy)
    result = json.loads((copy / "result.json").read_text())
    for name, path, upstream, ckpt in (("my_apc-1a2b3c4d", "/ckpts/my_apc", "/ckpts/my_apc", None),
                                       ("apc@apc_360hr.ckpt", "/ckpts/apc_360hr.ckpt", "apc", "/ckpts/apc_360hr.ckpt"),
                                       ("apc-synth", None, "apc-synth", None)):
        result["upstream"].update(name=name, path=path)
        (copy / "result.json").write_text(json.dumps(result))
        req, cfg, _ = rerun_request(copy / "result.json")
        assert (req.upstream, req.ckpt, req.out_dir) == (upstream, ckpt, str(tmp_path / "results"))
        assert req.lrs == (3e-3,) and req.seeds == (2,) and req.rerun and cfg.train.max_steps == 4
