"""Extraction throughput: ``bench extract`` machinery vs a plain transformers loop (run by hand, not by pytest).

    python tests/benchmarks/bench_extract.py [--utterances 80] [--threads 2] [--batch 8]

A randomly initialised Base-sized HuBERT (12 layers, 768-d, group-norm feature extractor, ~95 M parameters) runs over
N synthetic utterances of 1-8 s (wav files on disk) three ways, on the same threads, in one process:

- ``plain loop, batch B``: files in corpus order, B at a time, zero-padded to the longest, one
  ``HubertModel(..., output_hidden_states=True)`` call per batch (no attention mask, as for Base models), no bucketing;
- ``plain loop, one at a time``: the same loop with B = 1;
- ``bench extract``: ``benchmark.extract.extract_features`` (length buckets capped by audio seconds, exact
  per-utterance outputs, prefetching and writing every ``[L, T, D]`` to safetensors files).

Reported: audio seconds per wall second, and each method's speed relative to the padded plain loop.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch


def make_corpus(root: Path, n: int, seed: int = 0) -> list[tuple[Path, float]]:
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        seconds = float(rng.uniform(1.0, 8.0))
        t = np.arange(int(16000 * seconds)) / 16000
        wav = 0.1 * np.sin(2 * np.pi * rng.uniform(100, 300) * t) + 0.05 * rng.standard_normal(t.shape)
        path = root / f"spk{i % 7}" / f"utt{i:03d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wav.astype(np.float32), 16000)
        files.append((path, len(t) / 16000))
    return files


def plain_loop(model, files: list[tuple[Path, float]], batch: int) -> float:
    """The loop a user writes first: fixed-size batches in corpus order, padded, hidden states kept on the host."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(files), batch):
            waves = [sf.read(str(p), dtype="float32")[0] for p, _ in files[start: start + batch]]
            wavs = torch.zeros(len(waves), max(w.shape[0] for w in waves))
            for i, w in enumerate(waves):
                wavs[i, : w.shape[0]] = torch.from_numpy(w)
            out = model(wavs, output_hidden_states=True)
            [h.clone() for h in out.hidden_states]
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import HubertConfig, HubertModel

    from speechbench.benchmark.extract import extract_features, load_inputs
    from speechbench.upstreams.hf import HFUpstream

    torch.manual_seed(0)
    model = HubertModel(HubertConfig()).eval()  # Base: 12 layers, 768-d, group norm, no attention mask
    params = sum(p.numel() for p in model.parameters()) / 1e6
    upstream = HFUpstream(model, "hubert-base-random", "hubert", normalize=False)
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        files = make_corpus(work / "audio", args.utterances)
        audio_s = sum(s for _, s in files)
        with torch.inference_mode():  # warm-up (allocator, oneDNN primitives)
            model(torch.zeros(1, 32000), output_hidden_states=True)
        rows = [(f"plain loop, batch {args.batch} (padded, corpus order)", plain_loop(model, files, args.batch))]
        utts, root = load_inputs(work / "audio")
        summary = extract_features(upstream, utts, root, work / "feats", progress=False)
        rows.append(("bench extract (buckets, exact, writes safetensors)", summary.wall_seconds))
        rows.append(("plain loop, one at a time", plain_loop(model, files, 1)))
        written = sum(f.stat().st_size for f in (work / "feats").glob("*.safetensors")) / 1e9
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"HuBERT Base (random init, {params:.0f} M params), {args.utterances} utterances of 1-8 s = "
          f"{audio_s:.0f} s of audio, {args.threads} threads; bench extract wrote {written:.2f} GB float32")
    print(f"{'method':<52} {'wall s':>8} {'audio s / wall s':>17} {'vs padded loop':>15}")
    base = rows[0][1]
    for name, wall in rows:
        print(f"{name:<52} {wall:>8.1f} {audio_s / wall:>17.2f} {base / wall:>14.2f}x")


if __name__ == "__main__":
    main()
