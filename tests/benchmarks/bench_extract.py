"""Extraction throughput: ``bench extract`` vs a plain transformers loop, and its batch policy (run by hand).

    python tests/benchmarks/bench_extract.py [--utterances 40] [--threads 2] [--rounds 3] [--policies 0,4,16,160]

A randomly initialised Base-sized HuBERT (``HubertConfig()``: 12 layers, 768-d, group-norm feature extractor, ~95 M
parameters) runs over N synthetic utterances of ``--min-s``..``--max-s`` seconds (wav files on disk), on the same
threads, in one process, several ways:

- ``plain loop, one at a time``: files in corpus order, one ``HubertModel(..., output_hidden_states=True)`` call
  each, every hidden state copied (as a user keeping them would);
- ``plain loop, batch B``: the same, B files at a time zero-padded to the longest (no attention mask, as for Base
  models), no bucketing;
- ``bench extract, cap P s``: ``benchmark.extract.extract_features`` with ``max_batch_s=P`` (length buckets of at
  most P padded seconds; 0: one utterance per batch), exact per-utterance outputs, prefetching the audio and writing
  every ``[L, T, D]`` to a safetensors file. The device's default policy (``BATCH_POLICY_S``) is marked.

The machine is shared, so the methods are interleaved: each round runs every method once over the whole corpus, in
a rotated order, and each method's time is compared with the faster plain loop *of the same round*. Reported: the
median over rounds of wall seconds, audio seconds per wall second, and that ratio.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch


def make_corpus(root: Path, n: int, min_s: float, max_s: float, seed: int = 0) -> list[tuple[Path, float]]:
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        seconds = float(rng.uniform(min_s, max_s))
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
    parser.add_argument("--utterances", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="batch size of the padded plain loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policies", default="0,4,16,160", help="bench extract caps (padded seconds per batch)")
    parser.add_argument("--min-s", type=float, default=1.0)
    parser.add_argument("--max-s", type=float, default=8.0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import HubertConfig, HubertModel

    from speechbench.benchmark.extract import extract_features, load_inputs
    from speechbench.benchmark.features import BATCH_POLICY_S
    from speechbench.upstreams.hf import HFUpstream

    torch.manual_seed(0)
    model = HubertModel(HubertConfig()).eval()  # Base: 12 layers, 768-d, group norm, no attention mask
    params = sum(p.numel() for p in model.parameters()) / 1e6
    upstream = HFUpstream(model, "hubert-base-random", "hubert", normalize=False)
    policies = [float(p) for p in args.policies.split(",")]
    default = BATCH_POLICY_S["cpu"]
    if default not in policies:
        policies.append(default)
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    methods = {"plain loop, one at a time": lambda: plain_loop(model, files, 1),
               f"plain loop, batch {args.batch} (padded, corpus order)": lambda: plain_loop(model, files, args.batch)}

    def extract(cap: float) -> float:
        out = work / "feats"
        shutil.rmtree(out, ignore_errors=True)
        return extract_features(upstream, utts, root, out, max_batch_s=cap, progress=False).wall_seconds

    for cap in policies:
        mark = " (default on CPU)" if cap == default else ""
        methods[f"bench extract, cap {cap:g} s{mark}"] = (lambda c=cap: extract(c))
    times: dict[str, list[float]] = {name: [] for name in methods}
    ratios: dict[str, list[float]] = {name: [] for name in methods}
    try:
        files = make_corpus(work / "audio", args.utterances, args.min_s, args.max_s)
        audio_s = sum(s for _, s in files)
        utts, root = load_inputs(work / "audio")
        with torch.inference_mode():  # warm-up (allocator, oneDNN primitives)
            model(torch.zeros(1, 32000), output_hidden_states=True)
        names = list(methods)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            this_round = {name: methods[name]() for name in order}
            best_plain = min(this_round[n] for n in names[:2])
            for name, wall in this_round.items():
                times[name].append(wall)
                ratios[name].append(best_plain / wall)
            print(f"round {r + 1}: " + ", ".join(f"{n.split(' (')[0]} {w:.1f} s" for n, w in this_round.items()),
                  flush=True)
        written = sum(f.stat().st_size for f in (work / "feats").glob("*.safetensors")) / 1e9
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nHuBERT Base (random init, {params:.0f} M params), {args.utterances} utterances of {args.min_s:g}-"
          f"{args.max_s:g} s = {audio_s:.0f} s of audio, {args.threads} threads, {args.rounds} interleaved rounds; "
          f"bench extract writes {written:.2f} GB float32")
    print(f"{'method':<52} {'wall s':>8} {'audio s / wall s':>17} {'vs best plain loop':>19}")
    for name in methods:
        wall = statistics.median(times[name])
        print(f"{name:<52} {wall:>8.1f} {audio_s / wall:>17.2f} {statistics.median(ratios[name]):>18.0%}")
    print("(medians over rounds; the last column compares with the faster plain loop of the same round)")


if __name__ == "__main__":
    main()
