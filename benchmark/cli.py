"""``bench``: the command-line interface. Every subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EPILOG_RUN = """examples:
  bench run --upstream fbank_no_cmvn --task ks                 # synthetic corpus, recipe synth/ks
  bench run --upstream fbank --task ks --lr 1e-2,1e-3,1e-4     # learning-rate search: best on dev, scored on test
  bench run --upstream fbank --task ks --data-root /data/speech_commands_v0.01   # real corpus, recipe superb/ks
  bench run --upstream fbank --task ks train.max_steps=500 optim.lr=1e-3         # recipe overrides
"""


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench", description="SUPERB-style evaluation of frozen self-supervised speech representations.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'bench <command> --help' for a command's options. Without --data-root every task runs on the "
               "bundled synthetic corpus (a smoke benchmark, not SUPERB numbers).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="train and score one (upstream, task) evaluation",
                       description="Freeze the upstream, learn a weighted sum of its layers and the task's SUPERB "
                                   "head, pick the best dev checkpoint, score it on test, write result.json.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_RUN)
    p.add_argument("--upstream", required=True, help="upstream name (see 'bench list upstreams')")
    p.add_argument("--task", required=True, help="task name (see 'bench list tasks') or 'all'")
    p.add_argument("--recipe", help="recipe name or YAML path (default: synth/<task>, or superb/<task> "
                                    "when --data-root is given)")
    p.add_argument("--data-root", help="real corpus location (default: $SPEECHBENCH_DATA_ROOT/<corpus> if set, "
                                       "else the synthetic corpus)")
    p.add_argument("--lr", type=_float_list, default=(), help="learning rate(s), comma-separated: one head per "
                                                              "value from the same features, best on dev selected")
    p.add_argument("--seed", type=_int_list, default=(), help="training seed(s), comma-separated")
    p.add_argument("--layer", type=int, help="probe this single hidden state instead of the weighted sum")
    p.add_argument("--cache", choices=("auto", "pooled", "frames", "off"),
                   help="feature cache: pooled = per-layer time-means computed once (exact for utterance-level "
                        "heads); frames = float16 frames on disk; off = upstream forward at every step; "
                        "auto (default) = pooled where exact, else frames if the estimate fits cache_budget_gb")
    p.add_argument("--fold", type=int, help="run only this fold of a multi-fold task")
    p.add_argument("--out", default="results", help="results directory (default: results)")
    p.add_argument("--rerun", action="store_true", help="train again into a new run directory even when this "
                                                        "configuration already has a result.json")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")

    p = sub.add_parser("leaderboard", help="aggregate result.json files into leaderboard CSVs and a table",
                       description="Collect every result.json under RESULTS_DIR; write a wide CSV (one row per "
                                   "upstream and corpus) to --out and a long CSV (one row per result) beside it.")
    p.add_argument("results_dir", help="directory searched recursively for result.json")
    p.add_argument("--out", default="leaderboard.csv", help="wide CSV path; the long CSV is <stem>.long.csv")
    p.add_argument("--reference", default="superb_paper_2021", help="reference set for the SUPERB score")

    p = sub.add_parser("list", help="list upstreams, tasks or recipes")
    p.add_argument("what", choices=("upstreams", "tasks", "recipes"))

    p = sub.add_parser("data", help="datasets: build the synthetic corpus")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = data_sub.add_parser("synth", help="generate the synthetic speech corpus (all seven tasks)",
                            description="Synthesise the bundled corpus with espeak-ng: 16 kHz wav files and JSONL "
                                        "manifests for KS, IC, ER, SID, ASV, ASR and PR. Deterministic in --seed.")
    s.add_argument("--profile", default="small", help="tiny (tests, seconds) or small (default runs)")
    s.add_argument("--out", required=True, help="output directory (must not hold anything else)")
    s.add_argument("--seed", type=int, default=0)
    return parser


def _setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("speechbench")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from benchmark.run import RunRequest, run
    from downstreams.tasks import list_tasks

    torch.set_num_threads(int(os.environ.get("SPEECHBENCH_THREADS", os.cpu_count() or 1)))

    tasks = [t.name for t in list_tasks()] if args.task == "all" else [args.task]
    for task in tasks:
        rows = run(RunRequest(upstream=args.upstream, task=task, recipe=args.recipe, data_root=args.data_root,
                              overrides=tuple(args.overrides), lrs=args.lr, seeds=args.seed, layer=args.layer,
                              cache=args.cache, fold=args.fold, out_dir=args.out, rerun=args.rerun))
        for row in rows:
            mark = "*" if row["selected"] else " "
            fold = f" fold {row['fold']}" if row["fold"] is not None else ""
            corpus = " (synthetic corpus: smoke benchmark, not a SUPERB number)" if row["data"]["corpus"] == "synth" \
                else ""
            print(f"{mark} {row['task']}{fold} lr={row['learning_rate']:g} seed={row['seed']}: test {row['metric']} "
                  f"= {row['value']:.2f} {row['unit']}{corpus}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from leaderboard.build import build_leaderboard

    _, _, text = build_leaderboard(args.results_dir, args.out, reference=args.reference)
    print(text)
    print(f"wrote {args.out} and {Path(args.out).with_suffix('').as_posix()}.long.csv")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "upstreams":
        from upstreams.registry import list_upstreams

        for entry in list_upstreams():
            lines = entry.summary.strip().splitlines() or [""]
            print(f"{entry.name:<18} {lines[0]}")
            for line in lines[1:]:
                print(f"{'':<18} {line.strip()}")
    elif args.what == "tasks":
        from downstreams.tasks import list_tasks

        for t in list_tasks():
            direction = "higher is better" if t.higher_is_better else "lower is better"
            print(f"{t.name:<5} {t.summary} [{t.metric}, {t.unit}, {direction}; real corpus: {t.real_corpus}]")
    else:
        from benchmark.config import find_recipe, list_recipes, load_raw_recipe

        for name in list_recipes():
            print(f"{name:<16} {load_raw_recipe(find_recipe(name)).get('description', '')}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from downstreams.synth.corpus import generate_corpus

    out = generate_corpus(args.out, profile=args.profile, seed=args.seed)
    print(f"wrote the {args.profile} synthetic corpus (seed {args.seed}) to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from benchmark.config import ConfigError
    from downstreams.data import DataError

    handlers = {"run": cmd_run, "leaderboard": cmd_leaderboard, "list": cmd_list, "data": cmd_data}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, FileNotFoundError, FloatingPointError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"bench: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
