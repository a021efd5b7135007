"""Does our pretraining help? Bundled upstreams against their random twins on the synthetic tasks (run by hand).

    python tests/benchmarks/pretrain_evidence.py [--tasks ks,ic,sid,er,pr,asv,asr] [--out evidence] [key=value ...]

Runs ``bench run`` for every (upstream, task): the four bundled ``*-synth`` upstreams, their ``*-synth-random``
twins, ``fbank`` and ``fbank_no_cmvn``, each with the task's default synthetic recipe (extra ``key.sub=value``
overrides apply to every run). Finished runs are skipped (``bench run`` finds their result.json), so an interrupted
evidence run continues where it stopped. Then writes ``OUT/leaderboard.csv`` (+ ``.long.csv``) and prints, per family
and task, pretrained against random with the winner. Exit code 1 when a pretrained upstream does not beat its twin on
KS. Results on the synthetic corpus are a smoke benchmark, not SUPERB numbers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from speechbench.upstreams.families import pretrain_families

BASELINES = ("fbank", "fbank_no_cmvn")
ALL_TASKS = ("ks", "ic", "sid", "er", "pr", "asv", "asr")


def run_all(upstreams: list[str], tasks: list[str], results: Path, overrides: list[str]) -> None:
    for task in tasks:
        for upstream in upstreams:
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "speechbench", "run", "--upstream", upstream, "--task", task, "--out",
                   str(results), *overrides]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            tail = (proc.stdout.strip().splitlines() or [""])[-1]
            print(f"{upstream:<22} {task:<4} {time.perf_counter() - t0:7.1f} s  {tail}", flush=True)
            if proc.returncode != 0:
                sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def compare(wide, tasks: list[str], families: list[str]) -> bool:
    """Print pretrained vs random per family and task; True when every family wins on KS."""
    from speechbench.leaderboard.columns import column_direction

    by_name = {row["upstream"]: row for _, row in wide.iterrows()}
    columns = [c for c in wide.columns if c.split("_", 1)[0].lower() in tasks and column_direction(c) is not None
               and not c.endswith(("_folds", "_seeds"))]
    ks_ok, wins, total = True, 0, 0
    print(f"\n{'family':<10} {'column':<14} {'pretrained':>10} {'random':>10}  winner")
    for family in families:
        pre, rand = by_name.get(f"{family}-synth"), by_name.get(f"{family}-synth-random")
        for col in columns:
            if pre is None or rand is None or col not in pre or col not in rand:
                continue
            a, b = float(pre[col]), float(rand[col])
            better = a > b if column_direction(col) else a < b
            wins, total = wins + better, total + 1
            if col.lower().startswith("ks") and not better:
                ks_ok = False
            print(f"{family:<10} {col:<14} {a:>10.2f} {b:>10.2f}  {'pretrained' if better else 'RANDOM'}")
    print(f"\npretrained beats its random twin in {wins} of {total} (family, task) pairs; "
          f"KS for every family: {'yes' if ks_ok else 'NO'}")
    return ks_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(ALL_TASKS), help="comma-separated tasks (default: all seven)")
    parser.add_argument("--out", default="evidence", help="output directory (results/ and leaderboard.csv)")
    parser.add_argument("--families", default=",".join(pretrain_families()), help="bundled families to evaluate")
    parser.add_argument("--no-baselines", action="store_true", help="skip fbank and fbank_no_cmvn")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides for every bench run")
    args = parser.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    upstreams = [f"{f}-synth{suffix}" for f in families for suffix in ("", "-random")]
    upstreams += [] if args.no_baselines else list(BASELINES)
    out = Path(args.out)
    run_all(upstreams, tasks, out / "results", args.overrides)

    from speechbench.leaderboard.build import build_leaderboard

    wide, _, text = build_leaderboard(out / "results", out / "leaderboard.csv", reference=None)
    print(text)
    print(f"wrote {out / 'leaderboard.csv'}")
    sys.exit(0 if compare(wide, tasks, families) else 1)


if __name__ == "__main__":
    main()
