"""``bench run`` in one process against ``torchrun`` with N gloo processes on the CPU (run by hand, not by pytest).

    python tests/benchmarks/bench_torchrun.py [--upstream apc-synth] [--task ks] [--steps 200] [--cache off]
                                              [--nproc 2] [--rounds 2] [--profile tiny]

Each round runs the same evaluation twice, one process (with all the usable cores as torch threads) and N processes
(torchrun, gloo; each with cores / N threads), alternating which goes first, each into a fresh results folder and a
fresh feature cache (the synthetic corpus is shared), so both pay for their feature extraction. Reported per run:
the wall time of the command (with start-up), the phases its result.json records, and the test metric, which
must be the same: the N processes take the steps of the one process.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", default="apc-synth")
    parser.add_argument("--task", default="ks")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--cache", default="off", help="off: the upstream runs at every step (what DDP spreads)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", default="tiny")
    args = parser.parse_args()

    from speechbench.common import cache_root
    from speechbench.downstreams.synth.corpus import ensure_corpus

    ensure_corpus(args.profile)
    work = Path(tempfile.mkdtemp(prefix="bench_torchrun_"))
    overrides = [f"data.profile={args.profile}", f"train.max_steps={args.steps}",
                 f"train.eval_every={max(1, args.steps // 4)}", f"cache={args.cache}"]
    rows = []
    try:
        for r in range(args.rounds):
            for nproc in ([1, args.nproc] if r % 2 == 0 else [args.nproc, 1]):
                cache = work / f"cache-{r}-{nproc}"
                cache.mkdir()
                (cache / "synth").symlink_to(cache_root("synth"))
                env = {**os.environ, "SPEECHBENCH_CACHE": str(cache)}
                env.pop("SPEECHBENCH_THREADS", None)  # each process: usable CPUs / processes on the node
                launcher = [sys.executable] if nproc == 1 else [
                    sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                t0 = time.perf_counter()
                proc = subprocess.run([*launcher, "-m", "speechbench", "run", "--upstream", args.upstream, "--task",
                                       args.task, "--out", str(work / f"out-{r}-{nproc}"), "--json", *overrides],
                                      env=env, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode:
                    raise SystemExit(proc.stderr[-2000:])
                (row,) = json.loads(proc.stdout)
                rows.append((nproc, wall, row))
                phases = row["resources"]["phases_s"]
                print(f"round {r + 1}, {nproc} process(es): {wall:.1f} s wall; " +
                      ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) +
                      f"; test {row['metric']} {row['value']:.2f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.upstream} on {args.task} ({args.profile} corpus, {args.steps} steps, cache {args.cache}), "
          f"{os.cpu_count()} CPUs; threads per process {rows[0][2]['runtime']['threads']} (1 process) and "
          f"{next(r for n, _, r in rows if n > 1)['runtime']['threads']} ({args.nproc} processes)")
    for nproc in (1, args.nproc):
        mine = [(w, r) for n, w, r in rows if n == nproc]
        walls = ", ".join(f"{w:.1f}" for w, _ in mine)
        train = ", ".join(f"{r['resources']['phases_s']['train']:.1f}" for _, r in mine)
        values = sorted({r["value"] for _, r in mine})
        print(f"  {nproc} process(es): wall {walls} s; train phase {train} s; test {mine[0][1]['metric']} {values}")


if __name__ == "__main__":
    main()
