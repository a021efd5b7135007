"""How long the leaderboard's intervals and `bench compare` take on SUPERB-sized test sets (run by hand).

    python tests/benchmarks/bench_bootstrap.py [--resamples 1000]

Simulated per-item outcomes of the real test sets' sizes: KS 3,081 utterances (Speech Commands v0.01 test), SID
8,251 (VoxCeleb1 iden test), ASR 2,620 (LibriSpeech test-clean), ER 5 folds of ~1,100 (IEMOCAP), ASV 37,720 trials
over 40 enrolment speakers (VoxCeleb1 veri_test). Prints the wall time of one interval and of one paired comparison
per task. Times are wall clock on whatever machine runs it (and whatever else runs there).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from speechbench.leaderboard.stats import bootstrap_interval, item_scores, paired_bootstrap


def simulated_cells(rng: np.random.Generator) -> dict[str, tuple[dict, dict]]:
    def accuracy(n, p, prefix="u"):
        return item_scores([{"id": f"{prefix}{i}", "correct": int(c)} for i, c in enumerate(rng.random(n) < p)])

    lengths = rng.integers(5, 35, 2620)
    edits = {p: item_scores([{"id": f"u{i}", "edits": int(e), "ref_len": int(n)}
                             for i, (e, n) in enumerate(zip(rng.binomial(lengths, p), lengths, strict=True))])
             for p in (0.06, 0.07)}
    speakers = [f"id{k:05d}" for k in range(40)]
    enroll = rng.choice(speakers, 37720)
    labels = rng.integers(0, 2, 37720)
    trials = {shift: item_scores([{"id": f"t{i}", "label": int(lab), "score": float(lab * shift + rng.normal()),
                                   "enroll_speaker": str(s), "test_speaker": str(s)}
                                  for i, (lab, s) in enumerate(zip(labels, enroll, strict=True))])
              for shift in (2.5, 2.4)}
    return {
        "KS (3,081)": ({(None, 0): accuracy(3081, 0.95)}, {(None, 0): accuracy(3081, 0.94)}),
        "SID (8,251)": ({(None, 0): accuracy(8251, 0.80)}, {(None, 0): accuracy(8251, 0.79)}),
        "ASR (2,620)": ({(None, 0): edits[0.06]}, {(None, 0): edits[0.07]}),
        "ER (5 x 1,100)": ({(f, 0): accuracy(1100, 0.65, f"f{f}-") for f in range(1, 6)},
                           {(f, 0): accuracy(1100, 0.63, f"f{f}-") for f in range(1, 6)}),
        "ASV (37,720 trials, 40 speakers)": ({(None, 0): trials[2.5]}, {(None, 0): trials[2.4]}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()
    cells = simulated_cells(np.random.default_rng(0))
    print(f"{'task (items)':<34} {'interval':>10} {'paired':>10}   ({args.resamples} resamples)")
    for name, (a, b) in cells.items():
        t0 = time.perf_counter()
        bootstrap_interval(a, args.resamples)
        t1 = time.perf_counter()
        paired_bootstrap(a, b, args.resamples)
        t2 = time.perf_counter()
        print(f"{name:<34} {t1 - t0:>9.2f}s {t2 - t1:>9.2f}s")


if __name__ == "__main__":
    main()
