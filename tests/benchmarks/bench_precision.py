"""bf16 (and fp16) extraction against fp32: throughput and per-layer error (run by hand, not by pytest).

    python tests/benchmarks/bench_precision.py [--utterances 24] [--threads 2] [--rounds 3] [--precisions bf16]

A randomly initialised Base-sized HuBERT (``HubertConfig()``: 12 layers, 768-d, ~95 M parameters) extracts N
synthetic utterances of 1-8 s with ``benchmark.extract.extract_features`` (what ``bench extract --precision P``
runs: its CPU batch policy, writing float32 files), once per precision per round, the precisions interleaved and
rotated across rounds because the machine is shared. Reported: the median over rounds of audio seconds per wall
second and of the speed-up over fp32 *in the same round*.

Error metric, per hidden state ``l`` (0 = CNN/projection output, 12 = encoder output): the relative Frobenius error
over the valid frames of every utterance,

    err_l = sqrt(sum_u ||H_P[u, l] - H_fp32[u, l]||^2) / sqrt(sum_u ||H_fp32[u, l]||^2),

from the files both extractions wrote; the worst single utterance (the same ratio over its frames only) is shown
beside it. The machine's bf16 support is printed first: oneDNN uses bf16 instructions when the CPU has AVX512-BF16
or AMX (``lscpu`` flags ``avx512_bf16``, ``amx_bf16``); without them bf16 matrix products are emulated and slower
than fp32.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import torch


def cpu_support() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16", "avx512_vnni") if f in flags]
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported() if torch.backends.mkldnn.is_available() else False
    return (f"CPU flags: {', '.join(wanted) or 'none of avx512_bf16/amx'}; torch {torch.__version__}, oneDNN "
            f"available {torch.backends.mkldnn.is_available()}, oneDNN bf16 supported {bf16}, "
            f"capability {torch.backends.cpu.get_cpu_capability()}")


def matmul_peaks(threads: int) -> str:
    import time

    out = []
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024).to(dtype), torch.randn(1024, 1024).to(dtype)
        for _ in range(3):
            a @ b
        t0 = time.perf_counter()
        for _ in range(20):
            a @ b
        out.append(2 * 1024 ** 3 * 20 / (time.perf_counter() - t0) / 1e9)
    return f"1024x1024 matmul on {threads} thread(s): fp32 {out[0]:.0f} GFLOP/s, bf16 {out[1]:.0f} GFLOP/s " \
           f"({out[1] / out[0]:.1f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="bf16", help="compared with fp32, comma-separated (bf16, fp16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from bench_extract import make_corpus
    from safetensors.torch import load_file
    from transformers import HubertConfig, HubertModel

    from speechbench.benchmark.extract import extract_features, load_inputs, safe_file_name
    from speechbench.runtime import Runtime
    from speechbench.upstreams.hf import HFUpstream

    print(cpu_support())
    print(matmul_peaks(args.threads))
    torch.manual_seed(0)
    upstream = HFUpstream(HubertModel(HubertConfig()).eval(), "hubert-base-random", "hubert", normalize=False)
    precisions = ["fp32", *args.precisions.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_precision_"))
    speed: dict[str, list[float]] = {p: [] for p in precisions}
    ratio: dict[str, list[float]] = {p: [] for p in precisions}
    try:
        files = make_corpus(work / "audio", args.utterances, 1.0, 8.0)
        audio_s = sum(s for _, s in files)
        utts, root = load_inputs(work / "audio")
        extract_features(upstream, utts[:1], root, work / "warm", progress=False)
        for r in range(args.rounds):
            order = precisions[r % len(precisions):] + precisions[: r % len(precisions)]
            walls = {}
            for p in order:
                out = work / f"feats-{p}"
                shutil.rmtree(out, ignore_errors=True)
                walls[p] = extract_features(upstream, utts, root, out, progress=False,
                                            runtime=Runtime(precision=p)).wall_seconds
            for p in precisions:
                speed[p].append(audio_s / walls[p])
                ratio[p].append(walls["fp32"] / walls[p])
            print(f"round {r + 1}: " + ", ".join(f"{p} {walls[p]:.1f} s" for p in order), flush=True)
        errors = {}
        for p in precisions[1:]:
            num = den = None
            worst = torch.zeros(13)
            for u in utts:
                name = f"{safe_file_name(u.id)}.safetensors"
                ref = load_file(work / "feats-fp32" / name)["hidden_states"].double()  # [L, T, D]
                low = load_file(work / f"feats-{p}" / name)["hidden_states"].double()
                sq_err, sq_ref = (low - ref).square().sum((1, 2)), ref.square().sum((1, 2))
                num = sq_err if num is None else num + sq_err
                den = sq_ref if den is None else den + sq_ref
                worst = torch.maximum(worst, (sq_err / sq_ref).sqrt())
            errors[p] = ((num / den).sqrt(), worst)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nHuBERT Base (random init), {args.utterances} utterances = {audio_s:.0f} s of audio, {args.threads} "
          f"threads, bench extract's CPU batch policy, {args.rounds} interleaved rounds (medians)")
    for p in precisions:
        print(f"  {p:<5} {statistics.median(speed[p]):7.2f} audio s / wall s   "
              f"{statistics.median(ratio[p]):5.2f}x fp32")
    for p, (err, worst) in errors.items():
        print(f"\n{p} vs fp32, relative error per hidden state (all valid frames; worst utterance):")
        for layer in range(len(err)):
            print(f"  layer {layer:2d}: {100 * float(err[layer]):5.2f} %   "
                  f"(worst utterance {100 * float(worst[layer]):5.2f} %)")
        print(f"  max over layers: {100 * float(err.max()):.2f} %")


if __name__ == "__main__":
    main()
