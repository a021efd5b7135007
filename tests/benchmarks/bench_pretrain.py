"""Pretraining throughput per family (run by hand, not by pytest).

    python tests/benchmarks/bench_pretrain.py [--steps 30] [--base-steps 3] [--threads 2] [--families ...]

For APC, CPC, wav2vec 2.0 and HuBERT, each in its own process: ``bench pretrain`` with the shipped recipe (the
bundled size) on the synthetic ``small`` corpus for ``--steps`` updates, then a Base-size model (wav2vec 2.0 /
HuBERT Base: 12 x 768; APC: s3prl's 3 x 512; CPC: s3prl's 256) for ``--base-steps`` updates. Prints audio seconds per
wall second measured by the loop (warm-up steps included; HuBERT's k-means preparation excluded, it is timed
separately by the loop's log) and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNNER = ("import resource, sys; from benchmark.cli import main; rc = main(sys.argv[1:]); "
          "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
BASE = {
    "apc": ["model.hidden_size=512"],
    "cpc": ["model.hidden_encoder=256", "model.hidden_gar=256"],
    "wav2vec2": ["model.hidden_size=768", "model.num_hidden_layers=12", "model.num_attention_heads=12",
                 "model.intermediate_size=3072", "model.conv_dim=512,512,512,512,512,512,512",
                 "model.num_conv_pos_embeddings=128", "model.codevector_dim=256", "model.proj_codevector_dim=256",
                 "model.num_codevectors_per_group=320"],
    "hubert": ["model.hidden_size=768", "model.num_hidden_layers=12", "model.num_attention_heads=12",
               "model.intermediate_size=3072", "model.conv_dim=512,512,512,512,512,512,512",
               "model.num_conv_pos_embeddings=128", "objective.final_dim=256", "objective.num_clusters=100"],
}


def run(family: str, steps: int, extra: list[str], threads: int, work: Path) -> tuple[float, float, float, float]:
    """(audio s per wall s over the steps, peak RSS MB, wall s, trainable M params) of one pretraining process."""
    out = work / f"{family}-{len(extra)}-{steps}"
    env = dict(os.environ, SPEECHBENCH_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, "pretrain", "--model", family, "--out", str(out),
                           f"train.max_steps={steps}", f"train.save_every={steps}", "train.log_every=1",
                           "train.prepare_batches=16", *extra], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"pretraining {family} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rss = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("MAXRSS_KB"))) / 1024
    params = next(float(line.split("objective: ")[1].split("M")[0]) for line in proc.stdout.splitlines()
                  if "objective: " in line and "trainable" in line)
    return rows[-1]["audio_s_per_s"], rss, wall, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="updates at the bundled size")
    parser.add_argument("--base-steps", type=int, default=3, help="updates at Base size (0: skip)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--families", default="apc,cpc,wav2vec2,hubert")
    args = parser.parse_args()
    print(f"pretraining throughput: 16 crops x 2 s per update, synthetic small corpus, {args.threads} threads")
    print(f"{'family':<10} {'size':<8} {'params M':>8} {'steps':>5} {'audio s/s':>10} {'peak MB':>8} {'wall s':>7}")
    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        for family in [f.strip() for f in args.families.split(",") if f.strip()]:
            sizes = [("bundled", args.steps, [])] + ([("Base", args.base_steps, BASE[family])] if args.base_steps
                                                      else [])
            for size, steps, extra in sizes:
                speed, rss, wall, params = run(family, steps, extra, args.threads, Path(tmp))
                print(f"{family:<10} {size:<8} {params:>8.2f} {steps:>5} {speed:>10.1f} {rss:>8.0f} {wall:>7.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
