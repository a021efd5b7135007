"""``bench sweep --executor slurm`` against a real single-node Slurm (tests/slurm/cluster.sh): a job array, a
preempted job that is requeued and resumes, a rerun that skips finished jobs, --status, and a cancelled job that is
reported failed instead of waited for forever.

The cluster is started once per session and needs root (apt-get, munged as the munge user); without the packages
and no way to install them, these tests skip and say why. The only stand-in is the documented ``sacct`` test shim
(tests/slurm/bin/sacct): the cluster has no accounting database.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from speechbench.benchmark.cli import main
from speechbench.benchmark.sweep import load_sweep, plan_jobs, read_state, run_sweep, state_dir

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"

pytestmark = pytest.mark.slow


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A private one-node Slurm cluster for the session; the environment points at it (SLURM_CONF, the sacct shim
    first on PATH). Jobs are cancelled and the daemons stopped at the end."""
    pytest.importorskip("submitit", reason="the slurm executor needs submitit (pip install -e '.[dev]')")
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster needs root: it apt-installs slurm and runs munged as the munge user")
    t0 = time.monotonic()
    install = subprocess.run(["bash", str(CLUSTER), "install"], capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        pytest.skip(f"Slurm is not installable here: {_last_line(install.stderr + install.stdout)}")
    t1 = time.monotonic()
    directory = Path(tempfile.mkdtemp(prefix="speechbench-slurm-"))
    directory.chmod(0o755)  # munged (the munge user) must reach its socket folder inside
    start = subprocess.run(["bash", str(CLUSTER), "start", str(directory)], capture_output=True, text=True,
                           timeout=120)
    if start.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "stop", str(directory)], capture_output=True, timeout=120)
        pytest.fail(f"the Slurm test cluster did not start:\n{start.stdout}\n{start.stderr}")
    print(f"slurm test cluster: install {t1 - t0:.1f} s, start {time.monotonic() - t1:.1f} s", file=sys.stderr)
    env = {"SLURM_CONF": str(directory / "slurm.conf"),
           "PATH": f"{CLUSTER.parent / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield directory
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(directory)], capture_output=True, timeout=120)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def fresh_feature_cache(tmp_path, synth_tiny, session_cache, monkeypatch):
    """A feature cache of the test's own (sharing the session's tiny corpus), so builds can be counted exactly."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "synth").symlink_to(session_cache / "synth")
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(cache))
    return cache


def wait_until(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_slurm_sweep_requeues_a_preempted_job_which_resumes(slurm_cluster, fresh_feature_cache, tmp_path, capsys):
    from submitit import SlurmJob

    path = tmp_path / "slurm-ks.yaml"
    path.write_text(yaml.safe_dump({
        "upstreams": ["fbank_no_cmvn", "apc-synth"], "tasks": ["ks"], "lrs": [1e-2, 1e-3], "out": str(tmp_path / "res"),
        "overrides": ["data.profile=tiny", "train.max_steps=3000", "train.eval_every=250"],
        "executor": "slurm", "slurm": {"cpus_per_task": 1, "time_min": 60}}))
    sweep = load_sweep(str(path))
    directory = state_dir(sweep)

    assert main(["sweep", str(path), "--no-wait"]) == 0
    assert "2 jobs: 2 pending" in capsys.readouterr().out
    fbank, apc = (read_state(directory, j) for j in ("fbank_no_cmvn__ks", "apc-synth__ks"))
    array = fbank["slurm_job_id"].split("_")[0]
    assert (fbank["slurm_job_id"], apc["slurm_job_id"]) == (f"{array}_0", f"{array}_1")  # one job array

    # Preempt the fbank job once its first run has a checkpoint: submitit's own test hook sends SIGTERM then USR2.
    wait_until(lambda: list((tmp_path / "res" / "fbank_no_cmvn" / "ks").glob("*-lr0.01-*/checkpoints/last.pt")),
               180, "the first checkpoint of fbank_no_cmvn")
    SlurmJob(folder=directory / "slurm", job_id=fbank["slurm_job_id"])._interrupt()
    wait_until(lambda: (read_state(directory, "fbank_no_cmvn__ks")["attempts"][0].get("outcome") == "requeued"),
               60, "the requeue")

    # A rerun submits nothing new: it waits for the queued and running jobs, then writes the leaderboard.
    assert main(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 jobs: 2 done" in out and f"leaderboard: {tmp_path / 'res' / 'slurm-ks.leaderboard.csv'}" in out
    assert "apc-synth" in out and "fbank_no_cmvn" in out

    fbank = read_state(directory, "fbank_no_cmvn__ks")
    assert [a["outcome"] for a in fbank["attempts"]] == ["requeued", "done"]
    assert {a["slurm_job_id"] for a in fbank["attempts"]} == {f"{array}_0"}  # the same job, requeued
    assert fbank["attempts"][0]["threads"] == 1  # --cpus-per-task
    # No upstream pass repeated: the first attempt computed the 3 splits, the requeued one read them from the cache.
    assert [(a["features_computed"], a["features_from_cache"]) for a in fbank["attempts"]] == [(3, 0), (0, 3)]
    log_text = Path(fbank["attempts"][1]["log"]).read_text()
    assert "Caught signal SIGUSR2" in Path(fbank["attempts"][1]["log"]).with_suffix(".out").read_text()
    assert "resumed from" in log_text and "-lr0.01-" in log_text.split("resumed from", 1)[1].splitlines()[0]
    results = [json.loads(Path(p).read_text()) for p in fbank["results"]]
    assert sorted(r["learning_rate"] for r in results) == [1e-3, 1e-2] and {r["steps"] for r in results} == {3000}

    apc = read_state(directory, "apc-synth__ks")
    assert [(a["outcome"], a["features_computed"], a["features_from_cache"]) for a in apc["attempts"]] == [
        ("done", 3, 0)]

    # Finished jobs are skipped: nothing is submitted again.
    submitted = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert main(["sweep", str(path)]) == 0
    assert "2 jobs: 2 done" in capsys.readouterr().out
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == submitted
    assert len(read_state(directory, "fbank_no_cmvn__ks")["attempts"]) == 2
    assert main(["sweep", str(path), "--status"]) == 0
    assert "2 jobs: 2 done" in capsys.readouterr().out


def test_a_cancelled_slurm_job_is_reported_failed_not_waited_for(slurm_cluster, fresh_feature_cache, tmp_path,
                                                                 capsys):
    from speechbench.benchmark.slurm import attach_jobs, wait_for_jobs

    sweep = load_sweep(None, upstreams=("fbank_no_cmvn",), tasks=("ks",), out=str(tmp_path / "res"),
                       overrides=("data.profile=tiny", "train.max_steps=1000000", "train.eval_every=1000"),
                       executor="slurm", slurm={"cpus_per_task": 1, "time_min": 30})
    (job,) = plan_jobs(sweep)
    run_sweep(sweep, wait=False)
    directory = state_dir(sweep)
    wait_until(lambda: (read_state(directory, job.job_id) or {}).get("state") == "running", 120, "the job to start")
    slurm_id = read_state(directory, job.job_id)["slurm_job_id"]
    subprocess.run(["scancel", slurm_id], check=True)
    t0 = time.monotonic()
    wait_for_jobs(directory, attach_jobs(directory, {job.job_id: slurm_id}), poll_s=0.5)
    assert time.monotonic() - t0 < 60  # the sacct shim tells submitit the job ended
    assert main(["sweep", "--upstream", "fbank_no_cmvn", "--task", "ks", "--out", str(tmp_path / "res"),
                 "--executor", "slurm", "--status", *sweep.overrides]) == 0
    out = capsys.readouterr().out
    assert "1 jobs: 1 failed" in out and f"slurm job {slurm_id}: CANCELLED" in out
