"""Every command the README and docs/ show: it parses with today's CLI, and the runnable ones run.

Commands that need the network (a published checkpoint) or a real corpus are parsed only; their code paths are
tested elsewhere on local fixtures (tests/test_upstreams_*.py, tests/test_<task>.py).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest
from helpers import error_line, tiny_apc, write_wav

from speechbench.benchmark import cli
from speechbench.benchmark.cli import build_parser, main
from speechbench.downstreams.data import Utterance, write_manifest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY = ["data.profile=tiny", "train.max_steps=4", "train.eval_every=2"]


def documented_commands() -> list[tuple[str, str]]:
    """``(file, command line)`` for every ``bench ...`` line in the fenced code blocks of the README and docs."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.splitlines():
                for part in line.split("&&"):
                    part = part.split(" #")[0].split("|")[0].strip()
                    if part.startswith("bench ") and not re.search(r"[<\[]|COMMAND", part):  # not a usage line
                        found.append((path.name, part))
    return found


def test_docs_show_commands():
    commands = [c for _, c in documented_commands()]
    assert len(commands) > 30
    for name in ("run", "sweep", "leaderboard", "list", "data", "extract", "check-upstream", "pretrain", "compare",
                 "rerun", "cache"):
        assert any(c.split()[1] == name for c in commands), f"no documented example of bench {name}"


@pytest.mark.parametrize("where, command", documented_commands())
def test_documented_command_parses(where, command):
    try:
        build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit as e:
        pytest.fail(f"{where}: `{command}` does not parse (exit {e.code})")


@pytest.mark.parametrize("command", ["run", "sweep", "leaderboard", "list", "data", "extract", "check-upstream",
                                     "pretrain", "compare", "rerun", "cache"])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and "usage: bench" in capsys.readouterr().out


def test_main_job_and_its_run_options(tmp_path, synth_tiny, capsys):
    """The README's main job (apc-synth on KS) with --seed lists, --cache, --recipe, "already done" and --rerun."""
    out = str(tmp_path / "res")
    args = ["run", "--upstream", "apc-synth", "--task", "ks", "--recipe", "synth/ks", "--seed", "0,1",
            "--cache", "pooled", "--out", out, "--json", *TINY]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["seed"] for r in rows) == [0, 1] and all(r["features"].startswith("pooled") for r in rows)
    assert all(r["upstream"]["name"] == "apc-synth" and r["upstream"]["family"] == "apc" for r in rows)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out) == rows  # already done: the same rows, nothing retrained
    assert main([*args, "--rerun"]) == 0
    capsys.readouterr()
    assert len(list((tmp_path / "res" / "apc-synth" / "ks").glob("*-r2"))) == 2


def test_task_all_runs_every_task(tmp_path, synth_tiny, capsys):
    assert main(["run", "--upstream", "fbank_no_cmvn", "--task", "all", "--out", str(tmp_path), "--json",
                 "data.profile=tiny", "train.max_steps=2", "train.eval_every=2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["task"] for r in rows} == {"asr", "asv", "er", "ic", "ks", "pr", "sid"}
    assert sorted(r["fold"] for r in rows if r["task"] == "er") == [1, 2, 3, 4, 5]
    # every task's items.jsonl reproduces its value (accuracy, corpus WER/PER, trial EER, ER over 5 folds), so
    # every cell of the leaderboard gets an interval around it
    assert main(["leaderboard", str(tmp_path), "--out", str(tmp_path / "lb.csv"), "--resamples", "50"]) == 0
    capsys.readouterr()
    (row,) = pd.read_csv(tmp_path / "lb.csv").to_dict("records")
    for column in ("PR_per", "KS_acc", "IC_acc", "SID_acc", "ER_acc", "ASR_wer", "ASV_eer"):
        assert row[f"{column}_lo"] <= row[column] <= row[f"{column}_hi"], column


def test_data_root_environment_variable_names_the_corpus_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPEECHBENCH_DATA_ROOT", str(tmp_path))
    assert main(["run", "--upstream", "fbank", "--task", "ks", "--out", str(tmp_path / "r")]) == 2
    assert f"{tmp_path / 'speech_commands_v0.01'}: expected the corpus folder" in error_line(capsys.readouterr().err)


def test_data_synth_writes_a_corpus(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "synth"), "--profile", "tiny", "--seed", "0"]) == 0
    assert "wrote the tiny synthetic corpus" in capsys.readouterr().out
    assert (tmp_path / "synth" / "corpus.json").is_file() and (tmp_path / "synth" / "ks" / "test.jsonl").is_file()


def test_extract_with_audio_root_and_leaderboard_reference(tmp_path, capsys):
    write_wav(tmp_path / "audio" / "spk1" / "a.wav", 1.2, 0)
    write_manifest(tmp_path / "lists" / "test.jsonl", [Utterance("a", "spk1/a.wav", 1.2, "spk1", "test")])
    assert main(["extract", "--upstream", "fbank", "--data", str(tmp_path / "lists" / "test.jsonl"),
                 "--audio-root", str(tmp_path / "audio"), "--out", str(tmp_path / "feats")]) == 0
    assert "extracted 1 utterances" in capsys.readouterr().out
    result = {"schema_version": 2, "upstream": {"name": "x"}, "task": "ks", "split": "test", "metric": "accuracy",
              "value": 50.0, "unit": "%", "higher_is_better": True, "data": {"corpus": "synth"}, "fold": None,
              "learning_rate": 1e-3, "seed": 0, "selected": True}
    (tmp_path / "results" / "x").mkdir(parents=True)
    (tmp_path / "results" / "x" / "result.json").write_text(json.dumps(result))
    assert main(["leaderboard", str(tmp_path / "results"), "--out", str(tmp_path / "lb.csv"),
                 "--reference", "superb_paper_2021"]) == 0
    assert "x" in capsys.readouterr().out


def test_pretrain_on_a_folder_of_audio(tmp_path, capsys):
    for k in range(3):
        write_wav(tmp_path / "wavs" / f"{k}.wav", 2.5, k)
    assert main(["pretrain", "--model", "apc", "--data", str(tmp_path / "wavs"), "--out", str(tmp_path / "apc"),
                 "train.max_steps=2", "train.batch_size=2", "train.save_every=2", "train.crop_s=1.0"]) == 0
    assert "pretrained apc: step 2" in capsys.readouterr().out
    assert main(["check-upstream", str(tmp_path / "apc"), "--seconds", "2"]) == 0


def test_trust_checkpoint_flag_on_the_command_line(tmp_path, capsys):
    import datetime

    import torch

    from speechbench.upstreams.apc import apc_s3prl_checkpoint

    ckpt = apc_s3prl_checkpoint(tiny_apc())
    ckpt["saved_on"] = datetime.date(2021, 5, 1)  # outside the safe allow-list
    torch.save(ckpt, tmp_path / "apc.ckpt")
    assert main(["check-upstream", "apc", "--ckpt", str(tmp_path / "apc.ckpt"), "--seconds", "2"]) == 2
    assert "--trust-checkpoint" in error_line(capsys.readouterr().err)
    assert main(["check-upstream", "apc", "--ckpt", str(tmp_path / "apc.ckpt"), "--seconds", "2",
                 "--trust-checkpoint"]) == 0


def test_interrupt_exits_130_with_a_resume_hint(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_list", interrupted)
    assert main(["list", "tasks"]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
