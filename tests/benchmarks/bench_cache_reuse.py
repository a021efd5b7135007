"""One upstream pass per audio file: ER's five folds and ASR after PR, against an older speechbench (run by hand).

    mkdir -p /tmp/sb-old/speechbench && git archive 8598885 | tar -x -C /tmp/sb-old/speechbench
    python tests/benchmarks/bench_cache_reuse.py --old /tmp/sb-old [--profile tiny] [--per-split N] [--steps 200]
        [--threads 2]

Upstream: a Base-sized randomly initialised HuBERT (12 layers, 768-d, ``HubertConfig()``, seed 0, saved as an HF
directory). Synthetic corpus of ``--profile``; ``--per-split`` caps every split at a seeded random subset (note that
ER draws the subset per fold, so capped folds share fewer utterances than whole ones). Every run is its own
``bench run`` process in a fresh feature cache (the corpus is generated once and shared), timed from start to end.

(a) ER, all five folds, old code vs this checkout: wall time, and upstream passes counted per utterance. New:
    the ``extracted`` counts each fold's ``result.json`` records (``feature_cache``), checked against the distinct
    audio files of the five folds' manifests and against the keys of the cache's shard sidecars (each key once).
    Old: the utterances of every per-(fold, split) cache folder it wrote (its ``index.json`` files).
(b) PR, then ASR on the same corpus and the same cache: utterances extracted by the second run (target: 0).
Prints the test values of both versions side by side; a neural upstream's outputs depend on the batch they are
computed in by ~1e-6 (see check_identical_results.py), so ER folds 2-5, whose features now come from fold 1's
batches, may differ from the old code in the last digits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from old_vs_new import add_version_args, bench, fresh_cache, shared_corpus, version_paths


def make_hubert_base(path: Path) -> None:
    import torch
    from transformers import HubertConfig, HubertModel

    from speechbench.upstreams.hf import save_hf_checkpoint

    torch.manual_seed(0)
    save_hf_checkpoint(HubertModel(HubertConfig()), path, normalize=False)  # HubertConfig() is Base-sized


def old_extractions(cache: Path) -> int:
    """Utterances the old code ran through the upstream: one per row of every cache folder it built."""
    return sum(json.loads(p.read_text())["num_utterances"] for p in (cache / "features").glob("*/index.json"))


def new_extractions(rows: list[dict]) -> int:
    return sum(s["extracted"] for r in rows for s in r["feature_cache"]["splits"].values())


def distinct_audio(out: Path) -> int:
    from speechbench.downstreams.data import read_manifest

    return len({os.path.realpath(u.path) for m in out.rglob("manifests/*.jsonl") for u in read_manifest(m)})


def cached_keys(cache: Path) -> list[str]:
    return [k for p in (cache / "features").glob("v2/*/shards/*.json") for k in json.loads(p.read_text())["keys"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_args(parser)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--per-split", type=int, help="data.max_per_split (default: whole splits)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    old, new = version_paths(args)
    work = Path(tempfile.mkdtemp(prefix="cache-reuse-"))
    hubert = work / "hubert_base_rand"
    make_hubert_base(hubert)
    corpus = shared_corpus(work, args.profile)
    common = [f"data.profile={args.profile}", f"train.max_steps={args.steps}",
              f"train.eval_every={max(1, args.steps // 4)}"]
    if args.per_split:
        common.append(f"data.max_per_split={args.per_split}")
    print(f"upstream hubert_base_rand (HubertConfig(), random, seed 0); synthetic corpus {args.profile}"
          f"{f', max {args.per_split} per split' if args.per_split else ''}; {args.steps} steps; "
          f"{args.threads} threads; overrides: {' '.join(common)}\n")

    # (a) ER, five folds
    er = ["run", "--upstream", str(hubert), "--task", "er", *common]
    old_cache, new_cache = fresh_cache(work / "old-er", corpus), fresh_cache(work / "new-er", corpus)
    old_wall, old_rows = bench(er, old_cache, work / "out-old-er", old, args.threads)
    new_wall, new_rows = bench(er, new_cache, work / "out-new-er", new, args.threads)
    distinct, keys = distinct_audio(work / "out-new-er"), cached_keys(new_cache)
    print("(a) ER, folds 1-5")
    print(f"{'':<6} {'wall s':>8} {'upstream passes':>16} {'distinct audio files':>21}")
    print(f"{'old':<6} {old_wall:>8.1f} {old_extractions(old_cache):>16} {distinct:>21}")
    print(f"{'new':<6} {new_wall:>8.1f} {new_extractions(new_rows):>16} {distinct:>21}")
    per_fold = [new_extractions([r]) for r in sorted(new_rows, key=lambda r: r["fold"])]
    print(f"new: extracted per fold {per_fold}; cache keys {len(keys)} ({len(set(keys))} distinct); "
          f"exactly one pass per utterance: {new_extractions(new_rows) == distinct == len(keys) == len(set(keys))}")
    print(f"wall time old/new = {old_wall / new_wall:.2f}x")
    for o, n in zip(sorted(old_rows, key=lambda r: r["fold"]), sorted(new_rows, key=lambda r: r["fold"]),
                    strict=True):
        print(f"  fold {o['fold']}: test accuracy old {o['value']!r}, new {n['value']!r}"
              f"{'' if o['value'] == n['value'] else ' (differs)'}")

    # (b) PR, then ASR, one cache
    print("\n(b) PR, then ASR on the same corpus and cache")
    print(f"{'':<6} {'task':<4} {'wall s':>8} {'upstream passes':>16} {'test value':>20}")
    for version, path in (("old", old), ("new", new)):
        cache = fresh_cache(work / f"{version}-ctc", corpus)
        before = 0
        for task in ("pr", "asr"):
            wall, rows = bench(["run", "--upstream", str(hubert), "--task", task, *common], cache,
                               work / f"out-{version}-{task}", path, args.threads)
            if version == "old":
                total = old_extractions(cache)
                passes, before = total - before, total
            else:
                passes = new_extractions(rows)
            print(f"{version:<6} {task:<4} {wall:>8.1f} {passes:>16} {rows[0]['value']!r:>20}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
