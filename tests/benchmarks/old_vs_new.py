"""Shared by the scripts that run an older speechbench beside this one (bench_cache_reuse.py,
check_identical_results.py): the version options, one timed ``bench`` process, a shared synthetic corpus.

Make the old version with ``mkdir -p /tmp/sb-old/speechbench && git archive <commit> | tar -x -C
/tmp/sb-old/speechbench``; ``PYTHONPATH=/tmp/sb-old`` then imports it instead of the installed checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RUNNER = "import sys; from speechbench.benchmark.cli import main; sys.exit(main(sys.argv[1:]))"


def add_version_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--old", required=True, help="folder holding the old package as <old>/speechbench")
    parser.add_argument("--new", help="folder holding the new package as <new>/speechbench (default: the installed "
                                      "speechbench, i.e. this checkout)")


def version_paths(args: argparse.Namespace) -> tuple[str, str | None]:
    """``PYTHONPATH`` values of the old and the new version (None: the installed package)."""
    old = str(Path(args.old).resolve())
    if not (Path(old) / "speechbench" / "benchmark" / "run.py").is_file():
        sys.exit(f"{old}/speechbench/benchmark/run.py not found")
    return old, str(Path(args.new).resolve()) if args.new else None


def bench(args: list[str], cache: Path, out: Path, pythonpath: str | None, threads: int) -> tuple[float, list[dict]]:
    """One ``bench <args> --out OUT --json`` process with its own cache: (wall seconds, result rows)."""
    env = dict(os.environ, SPEECHBENCH_CACHE=str(cache), SPEECHBENCH_THREADS=str(threads))
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args, "--out", str(out), "--json"], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bench {' '.join(args)} failed (PYTHONPATH={pythonpath}):\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout)


def shared_corpus(work: Path, profile: str) -> Path:
    """Generate the synthetic corpus once; :func:`fresh_cache` links it into every cache."""
    subprocess.run([sys.executable, "-c", "import sys; from speechbench.downstreams.synth.corpus import ensure_corpus;"
                    "ensure_corpus(sys.argv[1], 0, progress=False)", profile],
                   env=dict(os.environ, SPEECHBENCH_CACHE=str(work / "gen")), check=True)
    shutil.move(str(work / "gen" / "synth"), work / "corpus")
    return work / "corpus"


def fresh_cache(path: Path, corpus: Path) -> Path:
    """An empty cache folder (no features) that finds the shared corpus as its ``synth/``."""
    path.mkdir(parents=True)
    os.symlink(corpus, path / "synth")
    return path
