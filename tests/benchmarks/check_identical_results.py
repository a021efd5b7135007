"""Same results as an older speechbench, to the last digit, for every task (run by hand, not by pytest).

    mkdir -p /tmp/sb-old/speechbench && git archive 8598885 | tar -x -C /tmp/sb-old/speechbench
    python tests/benchmarks/check_identical_results.py --old /tmp/sb-old [--upstreams fbank_no_cmvn,apc-synth]
        [--tasks ks,ic,sid,er,asr,pr,asv] [--steps 6] [--profile tiny]

Every (upstream, task) runs as its own ``bench run`` process, with the same recipe overrides, three ways:
- ``old``: the package under ``--old`` (``PYTHONPATH=<old>``), in a fresh feature cache;
- ``new``: this checkout, in a fresh feature cache per task (so it extracts exactly what the old code extracted);
- ``shared``: this checkout, every task of an upstream in one feature cache, in the order given (ER folds 2-5 and
  the later of ASR/PR reuse features that another fold or task extracted).
The synthetic corpus is generated once and shared by all (a symlink in each cache). Compared exactly (``==`` on the
JSON values): test value, extra metrics (dev metric included), learned layer weights, best step, steps.

An upstream whose outputs depend on the batch it runs in (padding, BLAS blocking: every neural upstream, by about
1e-6) can differ in the last digits in ``shared`` mode, where an utterance's features come from the batch of the
run that extracted it first; ``fbank_no_cmvn`` is bitwise batch-invariant (its rows never mix), so every mode must
agree exactly for it. The script prints whether the upstream is batch-invariant on a few utterances.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from old_vs_new import add_version_args, bench, fresh_cache, shared_corpus, version_paths

COMPARED = ("value", "extra_metrics", "layer_weights", "best_step", "steps")
INVARIANCE = """
import sys, torch
from speechbench.benchmark.features import upstream_hidden
from speechbench.downstreams.data import read_manifest
from speechbench.downstreams.synth.corpus import ensure_corpus
from speechbench.upstreams.registry import build_upstream
root = ensure_corpus(sys.argv[2], 0, progress=False)
utts = read_manifest(root / "er" / "utterances.jsonl")[:8]
up = build_upstream(sys.argv[1])
with torch.inference_mode():
    h, n = upstream_hidden(up, utts, root)
    same = all(torch.equal(h[i, :, :n[i]], upstream_hidden(up, [u], root)[0][0]) for i, u in enumerate(utts))
print("BATCH_INVARIANT", same)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_args(parser)
    parser.add_argument("--upstreams", default="fbank_no_cmvn,apc-synth")
    parser.add_argument("--tasks", default="ks,ic,sid,er,pr,asr,asv")
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    old, new = version_paths(args)
    work = Path(tempfile.mkdtemp(prefix="identical-"))
    corpus = shared_corpus(work, args.profile)
    common = [f"data.profile={args.profile}", f"train.max_steps={args.steps}",
              f"train.eval_every={max(1, args.steps // 2)}"]
    print(f"synthetic corpus {args.profile}, {args.steps} steps, {args.threads} thread(s); old = {old}\n")
    header = f"{'upstream':<14} {'task':<4} {'fold':>4} {'old value':>20} {'new':>9} {'shared':>9}  extracted(shared)"
    print(header + "\n" + "-" * len(header))
    failures = 0
    for upstream in args.upstreams.split(","):
        probe = subprocess.run([sys.executable, "-c", INVARIANCE, upstream, args.profile], capture_output=True,
                               text=True, env=dict(os.environ, SPEECHBENCH_CACHE=str(fresh_cache(
                                   work / f"probe-{upstream}", corpus))))
        invariant = "BATCH_INVARIANT True" in probe.stdout
        shared_cache = fresh_cache(work / f"shared-{upstream}", corpus)
        for task in args.tasks.split(","):
            run = ["run", "--upstream", upstream, "--task", task, *common]
            tag = f"{upstream}-{task}"
            rows = {
                "old": bench(run, fresh_cache(work / f"old-{tag}", corpus), work / f"out-old-{tag}", old,
                             args.threads)[1],
                "new": bench(run, fresh_cache(work / f"new-{tag}", corpus), work / f"out-new-{tag}", new,
                             args.threads)[1],
                "shared": bench(run, shared_cache, work / f"out-shared-{tag}", new, args.threads)[1],
            }
            for o, n, s in zip(rows["old"], rows["new"], rows["shared"], strict=True):
                same = {"new": all(o[k] == n[k] for k in COMPARED), "shared": all(o[k] == s[k] for k in COMPARED)}
                # must match: everything for a batch-invariant upstream; otherwise what was extracted in the same
                # batches as the old code did (a fresh cache, and not an ER fold after the first)
                must = {"new": invariant or not (task == "er" and (o["fold"] or 1) > 1), "shared": invariant}
                failures += sum(must[m] and not same[m] for m in same)
                marks = {m: "same" if same[m] else "DIFFERS" if must[m] else "differs*" for m in same}
                extracted = sum(v["extracted"] for v in (s.get("feature_cache") or {}).get("splits", {}).values())
                print(f"{upstream:<14} {task:<4} {o['fold'] or '-':>4} {o['value']!r:>20} {marks['new']:>9} "
                      f"{marks['shared']:>9}  {extracted}")
        print(f"{upstream}: outputs bitwise batch-invariant: {invariant}\n")
    shutil.rmtree(work, ignore_errors=True)
    print("differs*: features reused from another batch of a batch-variant upstream (allowed)")
    print("all identical where they must be" if not failures else f"{failures} unexpected difference(s) (DIFFERS)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
