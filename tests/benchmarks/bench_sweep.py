"""``bench sweep`` end to end, local and on Slurm (run by hand, not by pytest).

    python tests/benchmarks/bench_sweep.py [--profile small] [--steps N] [--jobs 2] [--executors local,slurm]

A sweep of 2 upstreams (fbank_no_cmvn, apc-synth) x 2 tasks (KS, IC) x 3 learning rates on the synthetic corpus,
once through the local executor (``--jobs`` processes at a time) and once through the single-node test Slurm
cluster of tests/slurm/cluster.sh (needs root; started and stopped here). Each executor gets a feature cache of
its own (the corpus is shared), so the jobs must compute every split's features themselves: with no upstream pass
repeated, each job computes each of its 3 splits once (12 in all) and reads none back from the cache.

Reports, per executor: wall time, job states, the feature counts per job, result files, and the one leaderboard.
Exit code 1 if a check fails. Timings depend on the machine's load (other processes share its cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
UPSTREAMS = ["fbank_no_cmvn", "apc-synth"]
TASKS = ["ks", "ic"]
LRS = [1e-2, 1e-3, 1e-4]


def sweep_once(executor: str, work: Path, corpus_cache: Path, args, env: dict) -> tuple[float, dict, str]:
    """Run the sweep through one executor in a fresh feature cache; return (wall s, --json report, table)."""
    cache = work / f"cache-{executor}"
    cache.mkdir()
    (cache / "synth").symlink_to(corpus_cache / "synth")
    overrides = [f"data.profile={args.profile}"] + ([f"train.max_steps={args.steps}"] if args.steps else [])
    path = work / f"bench-{executor}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"bench-{executor}", "upstreams": UPSTREAMS, "tasks": TASKS, "lrs": LRS, "overrides": overrides,
        "out": str(work / f"results-{executor}"), "executor": executor, "jobs": args.jobs,
        "slurm": {"cpus_per_task": max(1, 2 // args.jobs), "time_min": 60}}))
    env = {**os.environ, **env, "SPEECHBENCH_CACHE": str(cache)}
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "speechbench", "sweep", str(path)], env=env, capture_output=True,
                         text=True)
    wall = time.perf_counter() - t0
    if run.returncode not in (0, 1):
        sys.exit(f"bench sweep --executor {executor} failed:\n{run.stderr[-3000:]}")
    status = subprocess.run([sys.executable, "-m", "speechbench", "sweep", str(path), "--status", "--json"], env=env,
                            capture_output=True, text=True, check=True)
    table = run.stdout.split("leaderboard: ", 1)[-1].split("\n", 1)[-1] if "leaderboard: " in run.stdout else ""
    return wall, json.loads(status.stdout), table


def check(report: dict) -> list[str]:
    problems = []
    jobs = report["jobs"]
    if len(jobs) != len(UPSTREAMS) * len(TASKS):
        problems.append(f"{len(jobs)} jobs, expected {len(UPSTREAMS) * len(TASKS)}")
    for job in jobs:
        if job["state"] != "done":
            problems.append(f"{job['job']}: {job['state']} {job['error'] or ''}")
        if (job["features_computed"], job["features_from_cache"]) != (3, 0):
            problems.append(f"{job['job']}: features computed {job['features_computed']}, from cache "
                            f"{job['features_from_cache']} (expected 3 and 0: one upstream pass per split)")
        if len(job["results"]) != len(LRS):
            problems.append(f"{job['job']}: {len(job['results'])} results, expected {len(LRS)}")
    if not report["leaderboard"] or not Path(report["leaderboard"]).is_file():
        problems.append("no leaderboard written")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="small", choices=("tiny", "small"))
    parser.add_argument("--steps", type=int, help="train.max_steps (default: the synth recipes')")
    parser.add_argument("--jobs", type=int, default=2, help="local jobs at a time (Slurm: 2 CPUs / jobs per job)")
    parser.add_argument("--executors", default="local,slurm")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    from speechbench.downstreams.synth.corpus import ensure_corpus

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    work.chmod(0o755)
    corpus_cache = work / "corpus"
    t0 = time.perf_counter()
    ensure_corpus(args.profile, seed=0, cache_dir=corpus_cache / "synth", progress=False)
    print(f"{args.profile} synthetic corpus: {time.perf_counter() - t0:.0f} s; sweep: {' x '.join(UPSTREAMS)} x "
          f"{' x '.join(TASKS)} x lrs {LRS} ({len(UPSTREAMS) * len(TASKS)} jobs, {len(LRS)} heads each), "
          f"{args.steps or 'recipe'} steps")
    failures = 0
    for executor in args.executors.split(","):
        env: dict = {}
        cluster = None
        if executor == "slurm":
            if os.geteuid() != 0 or subprocess.run(["bash", str(CLUSTER), "install"]).returncode != 0:
                print("slurm: skipped (the test cluster needs root and Debian's slurm packages)")
                continue
            cluster = work / "slurm-cluster"
            t_start = time.perf_counter()
            subprocess.run(["bash", str(CLUSTER), "start", str(cluster)], check=True)
            print(f"slurm test cluster started in {time.perf_counter() - t_start:.1f} s")
            env = {"SLURM_CONF": str(cluster / "slurm.conf"),
                   "PATH": f"{CLUSTER.parent / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        try:
            wall, report, table = sweep_once(executor, work, corpus_cache, args, env)
        finally:
            if cluster:
                subprocess.run(["bash", str(CLUSTER), "stop", str(cluster)], check=False)
        problems = check(report)
        failures += bool(problems)
        computed = sum(j["features_computed"] for j in report["jobs"])
        reused = sum(j["features_from_cache"] for j in report["jobs"])
        print(f"\n== {executor}: {wall:.0f} s wall, jobs {report['counts']}, features computed {computed} / read "
              f"from cache {reused} over {len(report['jobs'])} jobs, "
              f"{sum(len(j['results']) for j in report['jobs'])} results")
        for job in report["jobs"]:
            print(f"   {job['job']:<22} {job['state']:<6} attempts {job['attempts']}  features computed "
                  f"{job['features_computed']}, from cache {job['features_from_cache']}, results {len(job['results'])}")
        print(f"   leaderboard {report['leaderboard']}\n{table.rstrip()}")
        print("   " + ("checks passed" if not problems else "FAILED: " + "; ".join(problems)))
    if args.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
