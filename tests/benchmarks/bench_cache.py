"""Feature cache vs on-the-fly upstream (run by hand, not by pytest).

    python tests/benchmarks/bench_cache.py [--per-split 100] [--steps 100] [--threads 2] [--skip-hubert]

On the synthetic KS task (``small`` profile, a seeded subset of ``--per-split`` utterances per split), with the same
recipe, steps and seed, for a Base-sized randomly initialised HuBERT (12 layers, 768-d, saved as an HF directory)
and for ``fbank_no_cmvn``:

(a) on the fly: ``bench run --cache off``: the upstream runs at every training step and every dev/test evaluation,
    as s3prl does;
(b) cached: ``bench run --cache pooled`` into an empty feature cache (extraction included in the time), run once
    before and once after (a) because the machine's load can change during the long (a) run; the ratio uses their
    mean;
(c) a 4-value learning-rate search from one cache against four on-the-fly runs.

Every configuration runs as its own ``bench run`` process; wall time and peak resident memory are measured per
process. The on-the-fly sweep of the HuBERT is timed for its first learning rate only and multiplied by four
(the four runs are identical in cost); pass ``--full-sweep`` to time all four. Also prints the frames-cache size
per audio hour for the HuBERT (measured on disk).
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

RUNNER = ("import resource, sys; from speechbench.benchmark.cli import main; rc = main(sys.argv[1:]); "
          "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")


def bench_run(upstream: str, out: Path, cache_dir: Path, threads: int, extra: list[str]) -> tuple[float, float, list]:
    """One ``bench run`` in a fresh process: (wall seconds, peak RSS MB, result rows)."""
    env = dict(os.environ, SPEECHBENCH_CACHE=str(cache_dir), SPEECHBENCH_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, "run", "--upstream", upstream, "--task", "ks", "--out",
                           str(out), *extra], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rss_kb = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("MAXRSS_KB")))
    rows = [json.loads(p.read_text()) for p in sorted(out.rglob("result.json"))]
    return wall, rss_kb / 1024, rows


def make_hubert_base(path: Path) -> None:
    import torch
    from transformers import HubertConfig, HubertModel

    from speechbench.upstreams.hf import save_hf_checkpoint

    torch.manual_seed(0)
    save_hf_checkpoint(HubertModel(HubertConfig()), path, normalize=False)  # HubertConfig() is Base-sized


def frames_gb_per_hour(upstream: str, cache_dir: Path, threads: int, common: list[str]) -> float:
    """Build a frames cache for a few utterances and scale its on-disk size to one hour of audio."""
    out = cache_dir / "frames-run"
    env = dict(os.environ, SPEECHBENCH_CACHE=str(cache_dir / "frames"), SPEECHBENCH_THREADS=str(threads))
    code = ("import sys; from speechbench.benchmark.run import *; from speechbench.benchmark.cache import FeatureStore;"
            "from speechbench.upstreams.registry import build_upstream;"
            "from speechbench.downstreams.tasks import get_task;"
            "t = get_task('ks'); req = RunRequest(upstream=sys.argv[1], task='ks', overrides=tuple(sys.argv[2:]));"
            "cfg = resolve_config(req, t); p = subsample(t.prepare(cfg.data, cfg.task_options), 20);"
            "up = build_upstream(sys.argv[1]); utts = p.splits['test']; store = FeatureStore.open(up, sys.argv[1]);"
            "store.ensure(up, utts, p.audio_root, 'frames');"
            "print('BYTES', sum(s.stat().st_size for s in store.shards.glob('*.safetensors')), 'SECONDS',"
            "sum(u.duration_s for u in utts))")
    proc = subprocess.run([sys.executable, "-c", code, upstream, *common], env=env, capture_output=True, text=True,
                          check=True)
    fields = proc.stdout.split()
    size, seconds = float(fields[fields.index("BYTES") + 1]), float(fields[fields.index("SECONDS") + 1])
    shutil.rmtree(out, ignore_errors=True)
    return size / seconds * 3600 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-split", type=int, default=100, help="utterances per split (seeded subset)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-hubert", action="store_true", help="only fbank_no_cmvn (seconds instead of minutes)")
    parser.add_argument("--full-sweep", action="store_true", help="time all four on-the-fly sweep runs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    common = [f"data.max_per_split={args.per_split}", f"train.max_steps={args.steps}",
              f"train.eval_every={max(args.steps // 2, 1)}", "train.batch_size=32", "optim.lr=1e-3"]
    lrs = "1e-2,1e-3,1e-4,1e-5"
    upstreams = ["fbank_no_cmvn"]
    if not args.skip_hubert:
        make_hubert_base(work / "hubert_base_random")
        upstreams.append(str(work / "hubert_base_random"))
    # the corpus is generated once, outside the timings
    bench_run("fbank_no_cmvn", work / "warmup", work / "corpus-cache", args.threads, [*common, "train.max_steps=1"])
    corpus = work / "corpus-cache" / "synth"
    print(f"KS (synthetic small, {args.per_split} utterances per split), {args.steps} steps x batch 32, "
          f"{args.threads} threads\n")
    header = f"{'upstream':<16} {'path':<34} {'wall s':>8} {'peak MB':>8} {'test acc %':>10}"
    print(header + "\n" + "-" * len(header))
    for upstream in upstreams:
        label = "hubert_base_rand" if upstream != "fbank_no_cmvn" else upstream
        timings = {}
        # (b) runs before and after (a), each into an empty cache, so that a change of the load from other jobs
        # during the long (a) run shows up instead of skewing the ratio; the ratio uses their mean
        for name, cache, run_id in (("(b) cached (pooled, cold cache)", "pooled", "pooled-1"),
                                    ("(a) on the fly (cache off)", "off", "off"),
                                    ("(b) cached, again after (a)", "pooled", "pooled-2")):
            cache_dir = work / f"cache-{label}-{run_id}"
            (cache_dir).mkdir()
            os.symlink(corpus, cache_dir / "synth")  # share the corpus, not the features
            wall, mb, rows = bench_run(upstream, work / f"out-{label}-{run_id}", cache_dir, args.threads,
                                       [*common, f"--cache={cache}"])
            timings[run_id] = (wall, rows[0]["value"])
            print(f"{label:<16} {name:<34} {wall:>8.1f} {mb:>8.0f} {rows[0]['value']:>10.2f}")
        cache_dir = work / f"cache-{label}-sweep"
        cache_dir.mkdir()
        os.symlink(corpus, cache_dir / "synth")
        wall_sweep, mb, rows = bench_run(upstream, work / f"out-{label}-sweep", cache_dir, args.threads,
                                         [*common, "--cache=pooled", "--lr", lrs])
        best = next(r for r in rows if r["selected"])
        print(f"{label:<16} {'(c) 4-lr search, cached':<34} {wall_sweep:>8.1f} {mb:>8.0f} {best['value']:>10.2f}")
        if label == "fbank_no_cmvn" or args.full_sweep:
            cache_dir = work / f"cache-{label}-sweep-off"
            cache_dir.mkdir()
            os.symlink(corpus, cache_dir / "synth")
            wall_fly, mb, rows = bench_run(upstream, work / f"out-{label}-sweep-off", cache_dir, args.threads,
                                           [*common, "--cache=off", "--lr", lrs])
            how = "measured"
        else:
            wall_fly, how = 4 * timings["off"][0], "4 x (a)"
        print(f"{label:<16} {'(c) 4-lr search, on the fly':<34} {wall_fly:>8.1f} {'':>8} {'':>10}  ({how})")
        off_wall, off_acc = timings["off"]
        on_wall, on_acc = (timings["pooled-1"][0] + timings["pooled-2"][0]) / 2, timings["pooled-1"][1]
        print(f"{label:<16} ratios: (a)/(b) = {off_wall / on_wall:.1f}x, sweep on-the-fly/cached = "
              f"{wall_fly / wall_sweep:.1f}x, |acc(a) - acc(b)| = {abs(off_acc - on_acc):.3f} points\n")
    if not args.skip_hubert:
        gb = frames_gb_per_hour(upstreams[1], work / "corpus-cache", args.threads, common)
        print(f"frames cache (float16) for the Base-sized HuBERT: {gb:.2f} GB per audio hour "
              "(13 layers x 768 x 50 fps)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
