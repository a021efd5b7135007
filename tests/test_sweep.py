"""``bench sweep``: the sweep file, the grid -> jobs grouping, the local executor end to end (processes, threads,
state files, logs, skip on rerun, --status, the sweep's own leaderboard, one upstream pass per split and group),
failures, and the Slurm executor's dry run. The real Slurm cluster tests are in tests/test_sweep_slurm.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import error_line

from speechbench.benchmark.cli import build_parser, main
from speechbench.benchmark.config import ConfigError
from speechbench.benchmark.sweep import (
    SweepJob,
    bench_command,
    job_statuses,
    leaderboard_path,
    load_sweep,
    plan_jobs,
    read_state,
    run_job,
    state_dir,
    sweep_hash,
    update_state,
    write_plan,
)
from speechbench.benchmark.sweep import main as sweep_main
from speechbench.common import SpeechbenchError, UnknownNameError, usable_cpus

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.profile=tiny", "train.max_steps=4", "train.eval_every=2"]


def write_sweep(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


# ---------------------------------------------------------------------------------------------------------------
# The sweep file
# ---------------------------------------------------------------------------------------------------------------


def test_sweep_file_is_parsed_into_frozen_dataclasses(tmp_path):
    path = write_sweep(tmp_path / "grid.yaml", upstreams=["fbank_no_cmvn", "apc-synth"], tasks=["ks", "er"],
                       folds=[1, 2], seeds=[0, 1], lrs=[1e-2, "1e-3"], overrides=TINY, out=str(tmp_path / "res"),
                       executor="slurm", slurm={"partition": "gpu", "gpus_per_node": 1, "time_min": 600,
                                                "mem_gb": 16, "setup": ["module load cuda"]})
    sweep = load_sweep(str(path))
    assert sweep.name == "grid"  # the file's stem
    assert sweep.upstreams == ("fbank_no_cmvn", "apc-synth") and sweep.tasks == ("ks", "er")
    assert sweep.folds == (1, 2) and sweep.seeds == (0, 1) and sweep.lrs == (1e-2, 1e-3)
    assert sweep.overrides == tuple(TINY) and sweep.out == str((tmp_path / "res").resolve())
    assert sweep.executor == "slurm" and sweep.jobs == 1
    assert (sweep.slurm.partition, sweep.slurm.gpus_per_node, sweep.slurm.time_min, sweep.slurm.mem_gb,
            sweep.slurm.setup) == ("gpu", 1, 600, 16.0, ("module load cuda",))
    with pytest.raises(AttributeError):
        sweep.lrs = ()  # frozen


def test_flags_replace_file_values_and_add_overrides(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", upstreams=["fbank_no_cmvn"], tasks=["ks"], lrs=[1e-3],
                       overrides=["data.profile=tiny"], slurm={"cpus_per_task": 8})
    sweep = load_sweep(str(path), upstreams=("apc-synth",), lrs=None, jobs=2, name="mine",
                       overrides=("train.max_steps=4",), slurm={"partition": "debug", "cpus_per_task": None})
    assert sweep.upstreams == ("apc-synth",) and sweep.lrs == (1e-3,) and sweep.jobs == 2 and sweep.name == "mine"
    assert sweep.overrides == ("data.profile=tiny", "train.max_steps=4")
    assert sweep.slurm.partition == "debug" and sweep.slurm.cpus_per_task == 8
    flags_only = load_sweep(None, upstreams=("fbank_no_cmvn",), tasks=("ks",), lrs=(1e-2, 1e-2, 1e-3))
    assert flags_only.name == "sweep" and flags_only.lrs == (1e-2, 1e-3)  # duplicates dropped, order kept


def test_local_paths_become_absolute_and_names_stay_names(tmp_path, monkeypatch):
    """Jobs may start elsewhere, so paths are made absolute, read as bench run reads them: a registered name wins
    over a folder of the same name, and a recipe is a path only when it is a YAML file."""
    monkeypatch.chdir(tmp_path)
    for folder in ("apc", "ckpts/mine", "corpora/ks", "synth/ks"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "mine.yaml").write_text("task: ks\n")
    sweep = load_sweep(None, upstreams=("apc", "ckpts/mine"), tasks=("ks",), recipe="mine.yaml",
                       data_root="corpora/ks", out="res")
    assert sweep.upstreams == ("apc", str(tmp_path / "ckpts" / "mine"))
    assert (sweep.recipe, sweep.data_root, sweep.out) == (str(tmp_path / "mine.yaml"), str(tmp_path / "corpora" / "ks"),
                                                          str(tmp_path / "res"))
    named = load_sweep(None, upstreams=("apc",), tasks=("ks",), recipe="synth/ks", data_root="/data/{task}")
    assert (named.recipe, named.data_root) == ("synth/ks", "/data/{task}")


@pytest.mark.parametrize("fields, message", [
    ({"upstreams": ["a"], "tasks": ["ks"], "learning_rates": [1e-3]},
     r"unknown key\(s\) \['learning_rates'\]; valid keys: name, upstreams, tasks, folds, seeds, lrs, overrides"),
    ({"upstreams": ["a"], "tasks": ["ks"], "slurm": {"gpus": 1}},
     r"slurm: unknown key\(s\) \['gpus'\]; valid keys: partition, time_min, cpus_per_task, gpus_per_node"),
    ({"upstreams": ["a"], "tasks": ["ks"], "lrs": ["fast"]}, r"\.lrs\[0\]: expected a number, got 'fast'"),
    ({"upstreams": ["a"], "tasks": ["ks"], "jobs": 0}, r"jobs must be at least 1, got 0"),
    ({"upstreams": ["a"], "tasks": ["ks"], "executor": "pbs"}, r"executor must be one of local, slurm, got 'pbs'"),
    ({"upstreams": ["a"], "tasks": ["ks"], "cache": "disk"}, r"cache must be one of auto, pooled, frames, off"),
    ({"upstreams": ["a"], "tasks": ["ks"], "lrs": [0.0]}, r"learning rates must be positive"),
    ({"upstreams": ["a"], "tasks": ["ks"], "precision": "fp64"}, r"bad.yaml: precision must be one of fp32, bf16"),
    ({"upstreams": ["a"], "tasks": ["ks"], "device": "gpu"}, r"bad.yaml: device 'gpu': expected auto"),
    ({"upstreams": ["a"], "tasks": ["ks"], "name": "my sweep"}, r"name 'my sweep' must be letters, digits"),
    ({"tasks": ["ks"]}, r"no upstreams \(the sweep file's upstreams: \[\.\.\.\], or --upstream A,B\)"),
    ({"upstreams": ["a"]}, r"no tasks"),
])
def test_bad_sweep_files_are_one_line_errors_naming_the_file(tmp_path, fields, message):
    path = write_sweep(tmp_path / "bad.yaml", **fields)
    with pytest.raises(ConfigError, match=message) as err:
        load_sweep(str(path))
    assert "\n" not in str(err.value) and (str(path) in str(err.value) or "no " in str(err.value))


def test_sweep_file_that_is_missing_not_yaml_or_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="sweep file .*nope.yaml not found"):
        load_sweep(str(tmp_path / "nope.yaml"))
    (tmp_path / "bad.yaml").write_text("upstreams: [a\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_sweep(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: a sweep file must be a mapping"):
        load_sweep(str(tmp_path / "list.yaml"))


def test_documented_sweep_file_is_valid():
    """The sweep file shown in docs/commands.md parses and plans (its upstreams and tasks exist)."""
    text = (ROOT / "docs" / "commands.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "upstreams:" in b]
    assert blocks, "docs/commands.md shows no sweep file"
    sweep = from_yaml_text(blocks[0])
    jobs = plan_jobs(sweep)
    assert len(jobs) == len(sweep.upstreams) * len(sweep.tasks) and sweep.lrs and sweep.executor == "local"


def from_yaml_text(text: str):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.yaml"
        path.write_text(text)
        return load_sweep(str(path))


# ---------------------------------------------------------------------------------------------------------------
# Grid -> jobs
# ---------------------------------------------------------------------------------------------------------------


def test_one_job_per_upstream_task_and_fold_with_every_lr_and_seed_inside(tmp_path):
    sweep = load_sweep(None, upstreams=("fbank_no_cmvn", "apc-synth"), tasks=("ks", "er"), folds=(1, 3),
                       seeds=(0, 1), lrs=(1e-2, 1e-3, 1e-4), out=str(tmp_path), overrides=tuple(TINY))
    jobs = plan_jobs(sweep)
    assert [(j.upstream, j.task, j.fold) for j in jobs] == [
        ("fbank_no_cmvn", "ks", None), ("apc-synth", "ks", None),
        ("fbank_no_cmvn", "er", 1), ("fbank_no_cmvn", "er", 3), ("apc-synth", "er", 1), ("apc-synth", "er", 3)]
    assert [j.job_id for j in jobs] == ["fbank_no_cmvn__ks", "apc-synth__ks", "fbank_no_cmvn__er__fold1",
                                        "fbank_no_cmvn__er__fold3", "apc-synth__er__fold1", "apc-synth__er__fold3"]
    for job in jobs:
        req = job.request(sweep)
        assert req.lrs == (1e-2, 1e-3, 1e-4) and req.seeds == (0, 1) and req.overrides == tuple(TINY)
        assert req.fold == job.fold and req.out_dir == str(tmp_path.resolve())
    all_folds = plan_jobs(load_sweep(None, upstreams=("fbank_no_cmvn",), tasks=("er",)))
    assert [j.fold for j in all_folds] == [1, 2, 3, 4, 5]  # no folds given: every fold is its own job


def test_the_job_is_what_bench_run_does(tmp_path):
    """The ``bench run`` line a job shows is the same request: parsed back by the CLI, every field matches."""
    sweep = load_sweep(None, upstreams=("fbank_no_cmvn",), tasks=("er",), folds=(2,), seeds=(3,),
                       lrs=(1e-2, 0.000123), recipe="synth/{task}", cache="pooled", layer=1, out=str(tmp_path),
                       overrides=tuple(TINY), device="cuda:1", precision="bf16")
    (job,) = plan_jobs(sweep)
    req = job.request(sweep)
    assert (req.device, req.precision) == ("cuda:1", "bf16")
    args = build_parser().parse_args(shlex.split(bench_command(req))[1:])
    assert (args.upstream, args.task, args.recipe, args.fold, args.lr, args.seed, args.cache, args.layer, args.out,
            tuple(args.overrides), args.device, args.precision) == (
        req.upstream, "er", "synth/er", 2, (1e-2, 0.000123), (3,), "pooled", 1, req.out_dir, tuple(TINY), "cuda:1",
        "bf16")


@pytest.mark.parametrize("changes, error, message", [
    ({"tasks": ("nope",)}, UnknownNameError, r"unknown task 'nope'; available: .*ks"),
    ({"tasks": ("ks",), "folds": (1,)}, ConfigError, r"folds \[1\]: none of the tasks \(ks\) has folds"),
    ({"tasks": ("er",), "folds": (9,)}, ConfigError, r"folds \[9\]: task er has folds \[1, 2, 3, 4, 5\]"),
    ({"tasks": ("ks",), "overrides": ("train.max_stepz=4",)}, ConfigError, r"unknown key\(s\) \['max_stepz'\]"),
    ({"tasks": ("ks",), "recipe": "synth/{tsk}"}, ConfigError, r"the only placeholder allowed is \{task\}"),
    ({"tasks": ("ks",), "recipe": "synth/er"}, ConfigError, r"recipe is for task 'er', not 'ks'"),
])
def test_bad_grids_fail_before_any_job_starts(tmp_path, changes, error, message):
    sweep = load_sweep(None, upstreams=("fbank_no_cmvn",), out=str(tmp_path), **changes)
    with pytest.raises(error, match=message):
        plan_jobs(sweep)
    assert not (tmp_path / ".sweep").exists()


def test_sweep_identity_is_the_grid_not_the_executor(tmp_path):
    base = {"upstreams": ("fbank_no_cmvn",), "tasks": ("ks",), "lrs": (1e-3,), "out": str(tmp_path)}
    sweep = load_sweep(None, **base)
    same = load_sweep(None, **base, executor="slurm", jobs=4, name="other", slurm={"partition": "gpu"})
    assert sweep_hash(sweep) == sweep_hash(same) and len(sweep_hash(sweep)) == 12
    assert state_dir(sweep) == tmp_path.resolve() / ".sweep" / sweep_hash(sweep)
    assert sweep_hash(load_sweep(None, **{**base, "lrs": (1e-3, 1e-2)})) != sweep_hash(sweep)
    assert sweep_hash(load_sweep(None, **base, overrides=("train.max_steps=4",))) != sweep_hash(sweep)
    # where jobs compute is not what they compute; the precision is (fp32 is the default, so the same sweep)
    assert sweep_hash(load_sweep(None, **base, device="cuda")) == sweep_hash(sweep)
    assert sweep_hash(load_sweep(None, **base, precision="fp32")) == sweep_hash(sweep)
    assert sweep_hash(load_sweep(None, **base, precision="bf16")) != sweep_hash(sweep)


# ---------------------------------------------------------------------------------------------------------------
# The local executor, end to end
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, synth_tiny, session_cache):
    """fbank_no_cmvn and apc-synth x KS x 2 learning rates, ``--jobs 2``, through ``bench sweep`` (one process per
    job). The jobs get a feature cache of their own (the tiny corpus is shared), so they must compute every split's
    features themselves, exactly once per job."""
    tmp = tmp_path_factory.mktemp("sweep")
    cache = tmp / "cache"
    cache.mkdir()
    (cache / "synth").symlink_to(session_cache / "synth")
    path = write_sweep(tmp / "ks-tiny.yaml", upstreams=["fbank_no_cmvn", "apc-synth"], tasks=["ks"],
                       lrs=[1e-2, 1e-3], overrides=TINY, out=str(tmp / "res"))
    old = os.environ.get("SPEECHBENCH_CACHE")
    os.environ["SPEECHBENCH_CACHE"] = str(cache)
    try:
        run = subprocess.run([sys.executable, "-m", "speechbench", "sweep", str(path), "--jobs", "2"],
                             capture_output=True, text=True, check=False, timeout=600)
    finally:
        os.environ["SPEECHBENCH_CACHE"] = old
    assert run.returncode == 0, run.stderr
    return {"path": path, "run": run, "sweep": load_sweep(str(path)), "cache": cache}


def test_local_sweep_runs_every_job_in_its_own_process_with_its_share_of_the_cores(local_sweep):
    sweep = local_sweep["sweep"]
    directory = state_dir(sweep)
    assert "local executor: 2 job(s), 2 at a time" in local_sweep["run"].stderr
    pids = set()
    for job_id in ("fbank_no_cmvn__ks", "apc-synth__ks"):
        state = read_state(directory, job_id)
        assert state["state"] == "done" and state["error"] is None
        (attempt,) = state["attempts"]
        assert attempt["outcome"] == "done" and attempt["threads"] == max(1, usable_cpus() // 2)
        pids.add(attempt["pid"])
        log_text = Path(attempt["log"]).read_text()
        assert attempt["log"] == str(directory / "logs" / f"{job_id}.log")
        assert f"job {job_id}: bench run --upstream {state['upstream']} --task ks --lr 0.01,0.001" in log_text
        rows = [json.loads(Path(p).read_text()) for p in state["results"]]
        assert sorted(r["learning_rate"] for r in rows) == [1e-3, 1e-2]
        assert sum(r["selected"] for r in rows) == 1  # best on dev, within the job
        assert {r["upstream"]["name"] for r in rows} == {state["upstream"]}
    assert len(pids) == 2 and os.getpid() not in pids


def test_no_upstream_pass_repeats_within_a_job(local_sweep):
    """Each job computes each split's features once (a fresh cache: 3 builds, 0 hits), shared by its 2 lrs."""
    directory = state_dir(local_sweep["sweep"])
    for job_id in ("fbank_no_cmvn__ks", "apc-synth__ks"):
        (attempt,) = read_state(directory, job_id)["attempts"]
        assert (attempt["features_computed"], attempt["features_from_cache"]) == (3, 0)
        log_text = Path(attempt["log"]).read_text()
        assert log_text.count("features of 32 train utterances ready") == 1
        assert "features computed by the upstream for 3 split(s), read from the cache for 0" in log_text
    assert attempt["utterances_extracted"] == 32 + 12 + 12  # train, dev, test of the tiny KS corpus, once each
    stores = [d for d in (local_sweep["cache"] / "features" / "v2").iterdir() if d.is_dir()]
    assert len(stores) == 2  # one feature store per upstream, nothing else


def test_sweep_leaderboard_holds_the_sweep_results_only(local_sweep, capsys):
    sweep = local_sweep["sweep"]
    board = leaderboard_path(sweep)
    assert board == Path(sweep.out) / "ks-tiny.leaderboard.csv"
    wide = pd.read_csv(board)  # a plain CSV: units in the .units.json sidecar
    assert sorted(wide["upstream"]) == ["apc-synth", "fbank_no_cmvn"] and "KS_acc" in wide
    long = pd.read_csv(board.with_name("ks-tiny.leaderboard.long.csv"))
    assert len(long) == 4 and long["counted"].sum() == 2
    assert "apc-synth" in local_sweep["run"].stdout and "leaderboard: " + str(board) in local_sweep["run"].stdout

    # A result that is not the sweep's, in the same results folder: bench leaderboard sees it, the sweep does not.
    results = [json.loads(Path(p).read_text()) for p in read_state(state_dir(sweep), "apc-synth__ks")["results"]]
    (first,) = [r for r in results if r["selected"]]  # the learning rate the leaderboard counts
    first["upstream"]["name"] = "intruder"
    (Path(sweep.out) / "intruder" / "ks" / "x").mkdir(parents=True)
    (Path(sweep.out) / "intruder" / "ks" / "x" / "result.json").write_text(json.dumps(first))
    assert main(["sweep", str(local_sweep["path"])]) == 0  # rerun: nothing to run, leaderboard rewritten
    assert "intruder" not in board.read_text() and "intruder" not in capsys.readouterr().out
    assert main(["leaderboard", sweep.out, "--out", str(Path(sweep.out) / "all.csv")]) == 0
    assert "intruder" in capsys.readouterr().out


def test_rerun_skips_finished_jobs(local_sweep, capsys, caplog):
    directory = state_dir(local_sweep["sweep"])
    before = {j: read_state(directory, j) for j in ("fbank_no_cmvn__ks", "apc-synth__ks")}
    with caplog.at_level("INFO", logger="speechbench"):
        assert main(["sweep", str(local_sweep["path"]), "--jobs", "2"]) == 0
    assert "2 jobs, 2 learning rate(s) x 1 seed(s) each; 0 to run, 2 done or still running" in caplog.text
    assert "local executor" not in caplog.text
    assert {j: read_state(directory, j) for j in before} == before  # no new attempt
    assert "2 jobs: 2 done" in capsys.readouterr().out


def test_status_shows_every_job(local_sweep, capsys):
    assert main(["sweep", str(local_sweep["path"]), "--status"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"sweep ks-tiny \[[0-9a-f]{12}\]: 2 jobs: 2 done", out)
    assert re.search(r"done +fbank_no_cmvn__ks +2 results; features computed 3, from cache 0", out)
    assert re.search(r"done +apc-synth__ks +2 results; features computed 3, from cache 0", out)
    assert main(["sweep", str(local_sweep["path"]), "--status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"] == {"done": 2} and status["leaderboard"].endswith("ks-tiny.leaderboard.csv")
    assert [j["state"] for j in status["jobs"]] == ["done", "done"]


def test_a_changed_grid_is_a_new_sweep_that_reuses_finished_runs(local_sweep, capsys):
    """One more learning rate: a new sweep (new hash), whose jobs find the two finished runs and the cached
    features; status before running says 'not started'."""
    path = local_sweep["path"]
    assert main(["sweep", str(path), "--lr", "1e-2,1e-3,1e-4", "--status"]) == 0
    out = capsys.readouterr().out
    assert "2 jobs: 2 not started" in out and "not started fbank_no_cmvn__ks" in out


# ---------------------------------------------------------------------------------------------------------------
# Failures and states
# ---------------------------------------------------------------------------------------------------------------


def test_a_failing_job_records_its_error_line_and_the_sweep_writes_no_leaderboard(tmp_path, capsys):
    sweep = load_sweep(None, upstreams=("fbank_no_cmvn", "no_such_upstream"), tasks=("ks",), out=str(tmp_path),
                       overrides=tuple(TINY))
    jobs = plan_jobs(sweep)
    directory = write_plan(sweep, jobs)
    with pytest.raises(SpeechbenchError, match="unknown upstream 'no_such_upstream'"):
        run_job(directory, "no_such_upstream__ks")
    state = read_state(directory, "no_such_upstream__ks")
    assert state["state"] == "failed"
    assert state["error"].startswith("unknown upstream 'no_such_upstream': not a registered name")
    assert state["attempts"][0]["outcome"] == "failed"
    statuses = {s["job"]: s for s in job_statuses(sweep, jobs)}
    assert statuses["no_such_upstream__ks"]["state"] == "failed"
    assert statuses["fbank_no_cmvn__ks"]["state"] == "not started"
    assert main(["sweep", "--upstream", "fbank_no_cmvn,no_such_upstream", "--task", "ks", "--out", str(tmp_path),
                 "--status", *TINY]) == 0
    out = capsys.readouterr().out
    assert "1 not started, 1 failed" in out and "failed      no_such_upstream__ks  unknown upstream" in out
    assert not leaderboard_path(sweep).exists()
    with pytest.raises(SpeechbenchError, match="no job 'nope'"):
        run_job(directory, "nope")


def test_a_local_job_whose_process_is_gone_is_failed(tmp_path):
    sweep = load_sweep(None, upstreams=("fbank_no_cmvn",), tasks=("ks",), out=str(tmp_path))
    jobs = plan_jobs(sweep)
    directory = write_plan(sweep, jobs)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    log_file = tmp_path / "job.log"
    log_file.write_text("step 2/4\nKilled\n")
    update_state(directory, jobs[0].job_id, state="running",
                 attempts=[{"host": os.uname().nodename, "pid": int(gone.stdout), "log": str(log_file)}])
    (status,) = job_statuses(sweep, jobs)
    assert status["state"] == "failed" and not status["alive"]
    assert status["error"] == f"process {int(gone.stdout)} ended without a final state; log: Killed"
    update_state(directory, jobs[0].job_id, attempts=[{"host": os.uname().nodename, "pid": os.getpid()}])
    (status,) = job_statuses(sweep, jobs)
    assert status["state"] == "running" and status["alive"]


def test_sweep_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["sweep", "a.yaml", "b.yaml"]) == 2
    assert "takes one sweep file, got a.yaml, b.yaml" in error_line(capsys.readouterr().err)
    assert main(["sweep", "--task", "ks", "--out", str(tmp_path)]) == 2
    assert "no upstreams" in error_line(capsys.readouterr().err)
    assert main(["sweep", "--upstream", "fbank_no_cmvn", "--task", "ks", "--out", str(tmp_path), "train.x=1"]) == 2
    assert "unknown key(s) ['x']" in error_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------------------------
# The Slurm executor without a cluster: the script, and a clear error
# ---------------------------------------------------------------------------------------------------------------


def test_slurm_dry_run_prints_the_jobs_and_submitits_sbatch_script(tmp_path, capsys):
    pytest.importorskip("submitit")
    args = ["sweep", "--upstream", "fbank_no_cmvn,apc-synth", "--task", "ks", "--lr", "1e-2,1e-3",
            "--out", str(tmp_path / "res"), "--name", "demo", "--executor", "slurm", "--partition", "gpu",
            "--gpus", "1", "--cpus", "8", "--mem-gb", "16", "--time-min", "600", "--dry-run", *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "would submit 2 job(s) as one Slurm job array:" in out
    assert "fbank_no_cmvn__ks: bench run --upstream fbank_no_cmvn --task ks --lr 0.01,0.001" in out
    script = out.split("sbatch script:\n", 1)[1]
    assert script.startswith("#!/bin/bash")
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=16GB", "#SBATCH --time=600",
                 "#SBATCH --signal=USR2@120", "#SBATCH --job-name=sweep-demo"):
        assert line in script.splitlines(), line
    assert f"-m submitit.core._submit {tmp_path.resolve() / 'res' / '.sweep'}" in script
    assert "2 jobs: 2 not started" in out
    assert not (tmp_path / "res").exists()  # a dry run writes nothing


def test_slurm_executor_without_slurm_says_so(tmp_path, monkeypatch, capsys):
    pytest.importorskip("submitit")
    if shutil.which("sbatch"):
        monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # hide a system Slurm
    assert main(["sweep", "--upstream", "fbank_no_cmvn", "--task", "ks", "--out", str(tmp_path),
                 "--executor", "slurm", *TINY]) == 2
    assert "sbatch not found on PATH" in error_line(capsys.readouterr().err)


def test_job_entry_point_reports_user_errors_in_one_line(tmp_path, capsys):
    assert sweep_main(["job", str(tmp_path), "x"]) == 2
    assert "not a sweep state folder" in error_line(capsys.readouterr().err)


def test_job_ids_are_file_names():
    assert SweepJob("s3prl:hubert", "ks").job_id == "s3prl_hubert__ks"
    assert SweepJob("org/model", "er", 2).job_id == "org_model__er__fold2"
