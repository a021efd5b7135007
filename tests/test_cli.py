"""The CLI's contract with its user: error lines and exit codes, stdout vs stderr, --json, upstream folders."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import error_line, tiny_apc, write_wav

from speechbench.benchmark import cli
from speechbench.benchmark.cli import main
from speechbench.upstreams.checkpoints import save_speechbench_checkpoint

TINY_KS = ["data.profile=tiny", "train.max_steps=20", "train.eval_every=10", "optim.lr=1e-2"]


def _pretrain_folder(root: Path) -> Path:
    """What `bench pretrain --model apc --out ROOT` leaves: pretrain.json, state files and ROOT/upstream."""
    model = tiny_apc()
    save_speechbench_checkpoint(root / "upstream", "apc", dataclasses.asdict(model.config), model.state_dict())
    (root / "pretrain.json").write_text(json.dumps({"family": "apc"}))
    (root / "log.jsonl").write_text("")
    return root


def test_user_error_is_one_line_with_exit_2_and_verbose_adds_the_traceback(tmp_path, capsys):
    args = ["run", "--upstream", "fbank", "--task", "ks", "--out", str(tmp_path), "optim.nope=1"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "valid keys" in error_line(captured.err) and captured.out == ""
    assert main(["-v", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("bench: error: ")
    assert main(["run", "--upstream", "fbank", "--task", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown task 'nope'; available: asr, asv" in error_line(capsys.readouterr().err)


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch):
    """A KeyError inside a command is a bug: it propagates (traceback, exit 1), it is not printed as `bench: error`."""
    def broken(args):
        return {}["missing"]

    monkeypatch.setattr(cli, "cmd_list", broken)
    with pytest.raises(KeyError):
        main(["list", "tasks"])


def test_bug_exits_1_with_traceback_in_a_real_process(tmp_path):
    """`python -m speechbench` on a bug: exit 1 and Python's traceback (checked with a results folder that is a
    file, which leaderboard code does not expect: a NotADirectoryError is no user-error type)."""
    code = ("import sys; from speechbench.benchmark import cli\n"
            "def broken(args): raise RuntimeError('boom')\n"
            "cli.cmd_list = broken\nsys.exit(cli.main(['list', 'tasks']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" in done.stderr and "RuntimeError: boom" in done.stderr
    assert "bench: error" not in done.stderr


@pytest.mark.parametrize("what, key", [("upstreams", "apc-synth"), ("families", "hubert"), ("tasks", "ks"),
                                       ("recipes", "synth/ks")])
def test_list_json(what, key, capsys):
    assert main(["list", what, "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert key in {item["name"] for item in items} and all(set(item) >= {"name"} for item in items)


def test_run_json_on_stdout_logs_on_stderr(tmp_path, synth_tiny, capsys):
    assert main(["run", "--upstream", "fbank_no_cmvn", "--task", "ks", "--out", str(tmp_path), "--json",
                 *TINY_KS]) == 0
    captured = capsys.readouterr()
    (row,) = json.loads(captured.out)  # stdout is exactly one JSON document
    assert row["task"] == "ks" and row["steps"] == 20
    assert "task ks, upstream fbank_no_cmvn" in captured.err
    assert main(["leaderboard", str(tmp_path), "--out", str(tmp_path / "lb.csv"), "--json"]) == 0
    captured = capsys.readouterr()
    (wide,) = json.loads(captured.out)
    assert wide["upstream"] == "fbank_no_cmvn" and wide["KS_acc"] == pytest.approx(row["value"])
    assert "wrote" in captured.err


def test_piping_into_head_is_not_an_error():
    done = subprocess.run(f"{sys.executable} -m speechbench list upstreams | head -1", shell=True,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() and "Traceback" not in done.stderr


def test_pretrain_folder_is_an_upstream_everywhere_and_gets_a_readable_results_folder(tmp_path, synth_tiny,
                                                                                      capsys):
    folder = _pretrain_folder(tmp_path / "ckpts" / "my_apc")
    assert main(["check-upstream", str(folder), "--seconds", "2"]) == 0
    assert "PASS" in capsys.readouterr().out
    write_wav(tmp_path / "wavs" / "a.wav", 1.0, 0)
    assert main(["extract", "--upstream", str(folder), "--data", str(tmp_path / "wavs"),
                 "--out", str(tmp_path / "feats")]) == 0
    assert (tmp_path / "feats" / "a.safetensors").is_file() and "extracted 1 utterances" in capsys.readouterr().out

    assert main(["run", "--upstream", str(folder), "--task", "ks", "--out", str(tmp_path / "res"), "--json",
                 *TINY_KS]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    (result,) = (tmp_path / "res").rglob("result.json")
    slug = result.relative_to(tmp_path / "res").parts[0]
    assert slug.startswith("my_apc-") and len(slug) == len("my_apc-") + 8 and not slug.startswith(".")
    assert row["upstream"]["name"] == slug and row["upstream"]["path"] == str(folder.resolve())
    assert row["upstream"]["family"] == "apc" and row["upstream"]["checkpoint_format"] == "speechbench"

    # the same checkpoint through another spelling of the path, or as DIR/upstream, lands in the same folder
    from speechbench.upstreams.registry import upstream_slug

    assert upstream_slug(str(folder) + "/") == slug == upstream_slug(str(folder / "upstream"))


def test_pretrain_folder_without_a_saved_upstream_says_so(tmp_path, capsys):
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "pretrain.json").write_text("{}")
    assert main(["check-upstream", str(tmp_path / "pre")]) == 2
    assert "a bench pretrain folder without a saved upstream yet" in error_line(capsys.readouterr().err)


def test_commands_use_the_usable_cpus(monkeypatch):
    import torch

    from speechbench import common

    monkeypatch.delenv("SPEECHBENCH_THREADS", raising=False)
    monkeypatch.setattr(common, "usable_cpus", lambda: 1)
    before = torch.get_num_threads()
    try:
        cli._set_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
