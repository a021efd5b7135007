"""Memory and speed of reading a Hugging Face dataset (``--data-root hf:...``): peak RSS stays bounded.

Builds (once) a LibriSpeech-shaped ``save_to_disk`` dataset of ``--rows`` rows (default 20,000) of short synthetic
audio (``--seconds`` each, 16-bit wav bytes in an Audio column; columns id, file, audio, text, speaker_id; splits
train/validation/test, the train split in 500 MB shards), then, in a fresh process per setting, prepares it as the
ASR task does (``get_task("asr").prepare``: every row scanned, durations read from the audio headers) and reads every
utterance's audio in a shuffled order (as the feature cache does), printing peak RSS (``resource.getrusage``) and
rows/s for each phase. Two settings side by side: the reader's default remapping (``hf_data.REMAP_BYTES``) and no
remapping (the Arrow files stay mapped, so every page read stays resident).

    python tests/benchmarks/bench_hf_data.py [--rows 20000] [--seconds 2.0] [--dir /tmp/sb-hf-bench]

Timings are noisy on a shared machine; the RSS figures are what this script is for.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def generate(out: Path, rows: int, seconds: float) -> None:
    import soundfile as sf
    from datasets import Audio

    from speechbench.downstreams.hf_data import Column, build_dataset, save_dataset_dict

    rng = np.random.default_rng(0)
    n = int(seconds * 16000)
    sizes = {"train": rows - 2 * (rows // 20), "validation": rows // 20, "test": rows // 20}
    import datasets

    splits, k = {}, 0
    for split, count in sizes.items():
        chunks = []
        for first in range(0, count, 2000):  # an Arrow binary array holds at most 2 GB: build in chunks
            ids, files, audio, speakers = [], [], [], []
            for _ in range(min(2000, count - first)):
                speaker, chapter = 100 + k % 250, k // 250
                uid = f"{speaker}-{chapter}-{k:06d}"
                buf = io.BytesIO()
                sf.write(buf, (rng.standard_normal(n) * 3000).astype(np.int16), 16000, format="WAV",
                         subtype="PCM_16")
                ids.append(uid)
                files.append(f"{split}/{speaker}/{chapter}/{uid}.wav")
                audio.append({"bytes": buf.getvalue(), "path": f"{uid}.wav"})
                speakers.append(speaker)
                k += 1
            chunks.append(build_dataset({
                "id": Column(ids), "file": Column(files), "audio": Column(audio, Audio(sampling_rate=16000)),
                "text": Column(["A SHORT SYNTHETIC SENTENCE"] * len(ids)), "speaker_id": Column(speakers)}))
        splits[split] = datasets.concatenate_datasets(chunks)

    tmp = out.with_name(out.name + ".unsharded")
    save_dataset_dict(splits, tmp)
    # reshard the train split as the hub's exports are: several Arrow files of at most 500 MB
    loaded = datasets.load_from_disk(str(tmp))
    loaded.save_to_disk(str(out), max_shard_size="500MB")
    import shutil

    shutil.rmtree(tmp)


def measure(root: Path, remap: bool) -> dict:
    import speechbench.downstreams.hf_data as hf_data
    from speechbench.benchmark.run import RunRequest, resolve_config
    from speechbench.downstreams.data import load_utterance_audio
    from speechbench.downstreams.tasks import get_task

    if not remap:
        hf_data._FILES.budget = 1 << 62  # never drop the mappings
    task = get_task("asr")
    cfg = resolve_config(RunRequest(upstream="fbank", task="asr", data_root=f"hf:{root}"), task)
    base = _rss_mb()
    t0 = time.perf_counter()
    prepared = task.prepare(cfg.data, cfg.task_options)
    prepare_s = time.perf_counter() - t0
    utts = [u for split in prepared.splits.values() for u in split]
    after_prepare = _rss_mb()
    order = np.random.default_rng(0).permutation(len(utts))
    t0 = time.perf_counter()
    samples = 0
    for i in order:
        samples += load_utterance_audio(utts[i], prepared.audio_root).shape[0]
    read_s = time.perf_counter() - t0
    return {"remap": remap, "rows": len(utts), "audio_h": round(samples / 16000 / 3600, 2),
            "rss_after_imports_mb": round(base), "peak_rss_after_prepare_mb": round(after_prepare),
            "peak_rss_after_reading_mb": round(_rss_mb()), "prepare_rows_per_s": round(len(utts) / prepare_s),
            "read_rows_per_s": round(len(utts) / read_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--dir", default="/tmp/sb-hf-bench")
    parser.add_argument("--phase", choices=("generate", "remap", "no-remap"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.dir) / f"asr-{args.rows}x{args.seconds:g}s"
    if args.phase == "generate":
        generate(root, args.rows, args.seconds)
        return
    if args.phase:
        print(json.dumps(measure(root, args.phase == "remap")))
        return

    # every phase in a fresh child of this small process (a child's ru_maxrss starts at its parent's RSS at fork)
    def phase(name: str) -> str:
        done = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--seconds", str(args.seconds),
                               "--dir", args.dir, "--phase", name], capture_output=True, text=True,
                              env={**os.environ, "SPEECHBENCH_THREADS": "1"})
        if done.returncode:
            sys.exit(f"phase {name} failed:\n{done.stderr}")
        return done.stdout.strip()

    if not (root / "dataset_dict.json").is_file():
        t0 = time.perf_counter()
        phase("generate")
        print(f"generated {root} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    size = sum(f.stat().st_size for f in root.rglob("*.arrow")) / 1e6
    print(f"dataset: {root} ({args.rows} rows of {args.seconds:g} s, {size:.0f} MB of Arrow files)")
    for mode in ("remap", "no-remap"):
        print(phase(mode))


if __name__ == "__main__":
    main()
