"""``bench``: the command-line interface. Every subcommand is a thin wrapper over a library function.

Streams: logs and progress bars go to stderr; stdout carries only results (``--json`` makes them JSON), so
``bench ... | tool`` works. Exit codes: 0 done, 1 a failed check (``check-upstream``) or a bug (with its
traceback), 2 a user error (:class:`speechbench.common.SpeechbenchError`, printed as one line; ``-v`` adds the
traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

EPILOG_RUN = """examples:
  bench run --upstream fbank_no_cmvn --task ks                 # synthetic corpus, recipe synth/ks
  bench run --upstream fbank --task ks --lr 1e-2,1e-3,1e-4     # learning-rate search: best on dev, scored on test
  bench run --upstream fbank --task ks --data-root /data/speech_commands_v0.01   # real corpus, recipe superb/ks
  bench run --upstream fbank --task ks train.max_steps=500 optim.lr=1e-3         # recipe overrides
  bench run --upstream hubert --task asr --device cuda --precision bf16          # one GPU, bf16 autocast
  torchrun --nproc-per-node 4 -m speechbench run --upstream hubert --task asr    # 4 processes (DDP), one per GPU
"""


EPILOG_PRETRAIN = """examples:
  bench pretrain --model apc --out ckpts/apc                        # recipe pretrain/apc on the synthetic corpus
  bench pretrain --model cpc --data /data/wavs --out ckpts/cpc       # your own audio (directory or manifest)
  bench pretrain --model hubert --out ckpts/hubert1
  bench pretrain --model hubert --iteration 2 --from ckpts/hubert1/upstream --out ckpts/hubert2
  bench pretrain --model wav2vec2 --out ckpts/w2v train.max_steps=200 optim.lr=1e-3   # recipe overrides
  bench run --upstream ckpts/apc/upstream --task ks                  # evaluate the result
"""


EPILOG_COMPARE = """examples:
  bench compare apc-synth apc-synth-random                          # names: their runs under results/
  bench compare my_hubert-1a2b3c4d hubert wav2vec2 --results runs   # the first against each of the others
  bench compare results/apc-synth results/apc-synth-random --json
"""


EPILOG_SWEEP = """examples:
  bench sweep sweep.yaml                                  # the grid of a sweep file, one job at a time, here
  bench sweep sweep.yaml --jobs 2                         # two jobs at a time, each with half of the cores
  bench sweep --upstream fbank_no_cmvn,apc-synth --task ks,ic --lr 1e-2,1e-3 data.profile=tiny   # a grid from flags
  bench sweep sweep.yaml --executor slurm --partition gpu --gpus 1 --time-min 600   # a Slurm job array
  bench sweep sweep.yaml --executor slurm --dry-run       # print the jobs and the sbatch script, submit nothing
  bench sweep sweep.yaml --status                         # each job: not started, pending, running, done, failed
"""


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


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


def _add_runtime_options(p: argparse.ArgumentParser, what: str = "the upstream forward and the head") -> None:
    from speechbench.runtime import DEVICE_HELP

    p.add_argument("--device", help=f"where {what} compute: {DEVICE_HELP}; default: the recipe's runtime.device, "
                                    "auto. Under torchrun, rank r uses cuda:LOCAL_RANK")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                   help="fp32 (default), or bf16/fp16 through torch.autocast (fp16 training with a grad scaler)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench", description="SUPERB-style evaluation of frozen self-supervised speech representations.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'bench <command> --help' for a command's options. Without --data-root every task runs on the "
               "bundled synthetic corpus (a smoke benchmark, not SUPERB numbers).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, and tracebacks for user errors too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="train and score one (upstream, task) evaluation",
                       description="Freeze the upstream, learn a weighted sum of its layers and the task's SUPERB "
                                   "head, pick the best dev checkpoint, score it on test, write result.json.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_RUN)
    p.add_argument("--upstream", required=True, help="upstream name (see 'bench list upstreams'), checkpoint path "
                                                     "(HF dir, fairseq .pt, s3prl .pt or ours), HF hub id, or "
                                                     "s3prl:<name>")
    p.add_argument("--ckpt", help="local checkpoint replacing the published one of a family/card --upstream")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that need full unpickling (can run code: only for files you trust)")
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
    _add_runtime_options(p)
    p.add_argument("--json", action="store_true", help="print the result rows as JSON on stdout")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")

    p = sub.add_parser("sweep", help="run a grid of evaluations as jobs, here or on Slurm",
                       description="Run upstreams x tasks x folds x seeds x learning rates as one job per (upstream, "
                                   "task, fold): each job trains all its learning rates and seeds from features "
                                   "computed once. Finished jobs are skipped on a rerun; when all are done the "
                                   "sweep's leaderboard is written to OUT/<name>.leaderboard.csv. Flags replace the "
                                   "sweep file's values; overrides add to its list. Exit code 1 if a job failed.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_SWEEP)
    p.add_argument("items", nargs="*", metavar="FILE | key.sub=value",
                   help="the sweep file (YAML, see docs/commands.md) and recipe overrides for every job")
    p.add_argument("--upstream", type=_str_list, help="upstreams, comma-separated")
    p.add_argument("--task", type=_str_list, help="tasks, comma-separated, or 'all'")
    p.add_argument("--fold", type=_int_list, help="folds of multi-fold tasks, comma-separated (default: all)")
    p.add_argument("--seed", type=_int_list, help="training seeds, comma-separated")
    p.add_argument("--lr", type=_float_list, help="learning rates, comma-separated (best on dev selected per job)")
    p.add_argument("--recipe", help="recipe name or YAML path for every task; {task} is replaced by the task")
    p.add_argument("--data-root", help="real corpus location; {task} is replaced by the task")
    p.add_argument("--cache", choices=("auto", "pooled", "frames", "off"), help="feature cache mode (as bench run)")
    p.add_argument("--layer", type=int, help="probe this single hidden state instead of the weighted sum")
    p.add_argument("--trust-checkpoint", action="store_true", default=None,
                   help="allow checkpoints that need full unpickling")
    _add_runtime_options(p, "each job's upstream forward and heads")
    p.add_argument("--out", help="results directory (default: results)")
    p.add_argument("--name", help="sweep name: names the leaderboard and the Slurm jobs (default: the file's stem)")
    p.add_argument("--executor", choices=("local", "slurm"), help="where jobs run (default: local)")
    p.add_argument("--jobs", type=int, help="local executor: jobs at a time, each with usable CPUs / N threads")
    p.add_argument("--partition", help="slurm: partition")
    p.add_argument("--time-min", type=int, help="slurm: time limit per job in minutes (jobs reaching it requeue)")
    p.add_argument("--gpus", type=int, help="slurm: GPUs per job")
    p.add_argument("--cpus", type=int, help="slurm: CPUs per job (its torch threads)")
    p.add_argument("--mem-gb", type=float, help="slurm: memory per job in GB")
    p.add_argument("--dry-run", action="store_true", help="print the jobs (and the sbatch script), run nothing")
    p.add_argument("--status", action="store_true", help="show each job's state and exit")
    p.add_argument("--no-wait", action="store_true", help="slurm: submit and return (the last job to finish "
                                                          "writes the leaderboard)")
    p.add_argument("--json", action="store_true", help="print the sweep's job states as JSON on stdout")

    p = sub.add_parser("leaderboard", help="aggregate result.json files into leaderboard CSVs and a table",
                       description="Collect every result.json under RESULTS_DIR; write a wide CSV (one row per "
                                   "upstream and corpus) to --out and a long CSV (one row per result) beside it.")
    p.add_argument("results_dir", help="directory searched recursively for result.json")
    p.add_argument("--out", default="leaderboard.csv", help="wide CSV path; the long CSV is <stem>.long.csv")
    p.add_argument("--reference", default="superb_paper_2021", help="reference set for the SUPERB score")
    p.add_argument("--resamples", type=int, default=1000,
                   help="bootstrap resamples for the 95%% intervals (default 1000; 0: no interval columns)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    p.add_argument("--report", metavar="DIR", help="also write DIR/index.html (a self-contained page with the table, "
                                                   "intervals, SUPERB score, notes and layer-weight figures), "
                                                   "DIR/leaderboard.md and DIR/figures/")
    p.add_argument("--json", action="store_true", help="print the wide table's rows as JSON on stdout")

    p = sub.add_parser("compare", help="paired significance tests between upstreams on the same test items",
                       description="Compare the first upstream with each of the others on every task both have: the "
                                   "difference, its 95%% paired-bootstrap interval, p-values (paired bootstrap; "
                                   "McNemar's exact test for accuracy), Holm's correction over all tests, and a "
                                   "verdict per task. Runs whose test items differ are refused.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_COMPARE)
    p.add_argument("upstreams", nargs="+", metavar="UPSTREAM_OR_DIR",
                   help="upstream names (looked up under --results) or directories of results (a run directory, or "
                        "e.g. results/my_hubert-1a2b3c4d); the first is compared with each of the others")
    p.add_argument("--results", default="results", help="results directory for upstream names (default: results)")
    p.add_argument("--resamples", type=int, default=1000, help="paired bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level after Holm's correction (0.05)")
    p.add_argument("--json", action="store_true", help="print one JSON object per test on stdout")

    p = sub.add_parser("rerun", help="re-run exactly the configuration recorded in a result.json",
                       description="Train again with the run's resolved config.yaml (recipe and overrides), upstream "
                                   "(refused if its checkpoint's sha256 changed), seed, learning rate and fold, into a "
                                   "new run directory; report whether the new value falls inside the original's "
                                   "95%% bootstrap interval.")
    p.add_argument("result", metavar="RESULT_JSON", help="path to a result.json (or its run directory)")
    p.add_argument("--out", help="results directory for the new run (default: the original's results directory)")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need full unpickling")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the original's interval")
    p.add_argument("--device", help="where to compute (default: the device the run recorded in its config.yaml); "
                                    "the precision is the recorded one")
    p.add_argument("--json", action="store_true", help="print the new result row and the check as JSON")

    p = sub.add_parser("extract", help="dump an upstream's layer-wise features, one safetensors file per utterance",
                       description="Write OUT/<utterance id>.safetensors (hidden_states [L, T, D], num_frames) and "
                                   "OUT/upstream.json; resumable (complete files are skipped).")
    p.add_argument("--upstream", required=True, help="upstream name, checkpoint path, HF hub id or s3prl:<name>")
    p.add_argument("--ckpt", help="local checkpoint replacing the published one of a family/card --upstream")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need full unpickling")
    p.add_argument("--data", required=True, help="directory of .wav/.flac files (recursive) or a JSONL manifest")
    p.add_argument("--audio-root", help="root of a manifest's relative audio paths (default: each row's audio_root, "
                                        "else found from the manifest)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="how the features are stored (default float32)")
    p.add_argument("--max-batch-s", type=float, help="cap on padded audio seconds per batch (default: the device's "
                                                     "policy: 16 on the CPU, 160 on CUDA)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32 (default), or bf16/fp16 through torch.autocast")

    p = sub.add_parser("check-upstream", help="check that an upstream honours the contract (PASS/FAIL per check)",
                       description="Declared attributes, frame counts, batched vs one-at-a-time agreement, a 30 s "
                                   "input, finite outputs. Exit code 1 when a check fails.")
    p.add_argument("upstream", metavar="NAME_OR_PATH", help="upstream name, checkpoint path, HF hub id or s3prl:<name>")
    p.add_argument("--ckpt", help="local checkpoint replacing the published one of a family/card upstream")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow checkpoints that need full unpickling")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the long-input check (default 30)")

    p = sub.add_parser("pretrain", help="pretrain APC, CPC, wav2vec 2.0 or HuBERT with its native objective",
                       description="Train a model with its native self-supervised objective on unlabelled audio, "
                                   "resumably; OUT/upstream is loadable by 'bench run --upstream OUT/upstream'.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_PRETRAIN)
    p.add_argument("--model", required=True, metavar="FAMILY",
                   help="model family with a native objective: apc, cpc, wav2vec2 or hubert ('bench list families')")
    p.add_argument("--data", help="'synth' (the synthetic corpus), a directory of .wav/.flac files (recursive) or a "
                                  "JSONL manifest (default: the recipe's data.source, synth)")
    p.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    p.add_argument("--recipe", help="recipe name or YAML path (default: pretrain/<model>, "
                                    "pretrain/hubert_iter2 with --iteration 2)")
    p.add_argument("--iteration", type=int, choices=(1, 2), help="HuBERT iteration: 2 clusters a hidden layer of "
                                                                 "the iteration-1 model given by --from")
    p.add_argument("--from", dest="teacher", metavar="DIR", help="HuBERT iteration 2: the iteration-1 upstream "
                                                                 "(OUT/upstream of the first run)")
    _add_runtime_options(p, "the model and its objective")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")

    p = sub.add_parser("cache", help="see and reclaim the feature cache: ls, du, prune",
                       description="The feature cache ($SPEECHBENCH_CACHE/features) keeps every upstream's features "
                                   "per audio file across runs, folds and tasks. ls: one line per upstream; du: disk "
                                   "use; prune: remove shards by age and/or upstream (their audio is extracted "
                                   "again when a run needs it).")
    cache_sub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    for action, text in (("ls", "one line per upstream: name, key, utterances (pooled, frames), size, last use"),
                         ("du", "disk use per upstream and in total")):
        s = cache_sub.add_parser(action, help=text, description=text)
        s.add_argument("--json", action="store_true", help="print JSON on stdout")
    s = cache_sub.add_parser("prune", help="remove cached features by age and/or upstream",
                             description="Remove the shards not used for D (--older-than) and/or those of one "
                                         "upstream (--upstream), or everything (--all).")
    s.add_argument("--older-than", metavar="D", help="age since last use: a number and a unit s, m, h, d, w "
                                                     "(e.g. 30d, 12h)")
    s.add_argument("--upstream", metavar="U", help="an upstream's name, a label it ran under (the results folder "
                                                   "name), or the first 6+ characters of its cache key")
    s.add_argument("--all", action="store_true", help="remove every cached feature")
    s.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    s.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")

    p = sub.add_parser("list", help="list upstreams, model families, tasks or recipes")
    p.add_argument("what", choices=("upstreams", "families", "tasks", "recipes"))
    p.add_argument("--json", action="store_true", help="print a JSON list of objects on stdout")

    p = sub.add_parser("data", help="datasets: build the synthetic corpus")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = data_sub.add_parser("synth", help="generate the synthetic speech corpus (all seven tasks)",
                            description="Synthesise the bundled corpus with espeak-ng: 16 kHz wav files and JSONL "
                                        "manifests for KS, IC, ER, SID, ASV, ASR and PR. Deterministic in --seed.")
    s.add_argument("--profile", default="small", choices=("tiny", "small", "medium"),
                   help="tiny (tests, seconds), small (default runs, ~1 min) or medium (~4x small)")
    s.add_argument("--out", required=True, help="output directory (must not hold anything else)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", default="native", choices=("native", "hf"),
                   help="native (wav files + JSONL manifests; default) or hf: also OUT/hf/<task>/, one Hugging Face "
                        "save_to_disk dataset per task (--data-root hf:OUT/hf/<task>)")
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (it may be replaced after set-up, e.g. under pytest)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always follows sys.stderr
        pass


def _setup_logging(verbose: bool) -> None:
    from speechbench.runtime import dist_env

    logger = logging.getLogger("speechbench")
    # under torchrun rank 0 tells the story; the other ranks only warn
    logger.setLevel(logging.WARNING if dist_env().rank else logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False


def _set_threads() -> None:
    """Torch intra-op threads: ``$SPEECHBENCH_THREADS``, else the CPUs this process may use (affinity, quota)."""
    import torch

    from speechbench.common import default_threads

    torch.set_num_threads(default_threads())


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def cmd_run(args: argparse.Namespace) -> int:
    from speechbench.benchmark.run import RunRequest, run
    from speechbench.downstreams.tasks import list_tasks
    from speechbench.runtime import dist_env

    _set_threads()

    tasks = [t.name for t in list_tasks()] if args.task == "all" else [args.task]
    all_rows = []
    for task in tasks:
        rows = run(RunRequest(upstream=args.upstream, task=task, recipe=args.recipe, data_root=args.data_root,
                              overrides=tuple(args.overrides), lrs=args.lr, seeds=args.seed, layer=args.layer,
                              cache=args.cache, fold=args.fold, out_dir=args.out, rerun=args.rerun,
                              ckpt=args.ckpt, trust_checkpoint=args.trust_checkpoint, device=args.device,
                              precision=args.precision))
        all_rows += rows
        if args.json or dist_env().rank:  # one process prints: rank 0 of a torchrun job
            continue
        for row in rows:
            mark = "*" if row["selected"] else " "
            fold = f" fold {row['fold']}" if row["fold"] is not None else ""
            corpus = " (synthetic corpus: smoke benchmark, not a SUPERB number)" if row["data"]["corpus"] == "synth" \
                else ""
            print(f"{mark} {row['task']}{fold} lr={row['learning_rate']:g} seed={row['seed']}: test {row['metric']} "
                  f"= {row['value']:.2f} {row['unit']}{corpus}")
        for m in fold_means(rows):
            corpus = " (synthetic corpus: smoke benchmark, not a SUPERB number)" if m["corpus"] == "synth" else ""
            print(f"= {m['task']} mean over folds {','.join(map(str, m['folds']))} seed={m['seed']}: test "
                  f"{m['metric']} = {m['value']:.2f} {m['unit']}{corpus}")
    if args.json and not dist_env().rank:
        _print_json(all_rows)
    return 0


def fold_means(rows: list[dict]) -> list[dict]:
    """For tasks evaluated over folds (ER): per (task, seed), the mean test value of the selected rows over folds.

    Only groups with two or more folds are returned, as dicts with task, seed, folds (sorted), value (the mean),
    metric, unit and corpus. The leaderboard applies the same rule (``leaderboard/tables.py``, rule 4).
    """
    groups: dict[tuple, dict[int, dict]] = {}
    for row in rows:
        if row.get("fold") is None or not row.get("selected", True):
            continue
        groups.setdefault((row["task"], row["seed"]), {})[row["fold"]] = row
    out = []
    for (task, seed), by_fold in groups.items():
        if len(by_fold) < 2:
            continue
        first = next(iter(by_fold.values()))
        out.append({"task": task, "seed": seed, "folds": sorted(by_fold),
                    "value": sum(r["value"] for r in by_fold.values()) / len(by_fold),
                    "metric": first["metric"], "unit": first["unit"], "corpus": first.get("data", {}).get("corpus")})
    return out


def cmd_sweep(args: argparse.Namespace) -> int:
    from speechbench.benchmark.config import ConfigError
    from speechbench.benchmark.sweep import load_sweep, run_sweep, sweep_status

    files = [item for item in args.items if "=" not in item]
    if len(files) > 1:
        raise ConfigError(f"bench sweep takes one sweep file, got {', '.join(files)} (overrides are key.sub=value)")
    sweep = load_sweep(files[0] if files else None, overrides=tuple(i for i in args.items if "=" in i),
                       upstreams=args.upstream, tasks=args.task, folds=args.fold, seeds=args.seed, lrs=args.lr,
                       recipe=args.recipe, data_root=args.data_root, cache=args.cache, layer=args.layer,
                       trust_checkpoint=args.trust_checkpoint, device=args.device, precision=args.precision,
                       out=args.out, name=args.name, executor=args.executor,
                       jobs=args.jobs, slurm={"partition": args.partition, "time_min": args.time_min,
                                              "gpus_per_node": args.gpus, "cpus_per_task": args.cpus,
                                              "mem_gb": args.mem_gb})
    report = sweep_status(sweep) if args.status else run_sweep(sweep, dry_run=args.dry_run, wait=not args.no_wait)
    if args.json:
        _print_json(report.to_json())
    else:
        print(report.format())
    failed = any(j["state"] == "failed" for j in report.jobs)
    return 1 if failed and not (args.status or args.dry_run) else 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from speechbench.benchmark.config import ConfigError
    from speechbench.leaderboard.build import build_leaderboard, long_csv_path
    from speechbench.leaderboard.tables import units_path

    if args.resamples < 0:
        raise ConfigError(f"--resamples must be 0 (no intervals) or more, got {args.resamples}")
    wide, _, text = build_leaderboard(args.results_dir, args.out, reference=args.reference,
                                      resamples=args.resamples, seed=args.seed, report_dir=args.report)
    if args.json:
        _print_json(json.loads(wide.to_json(orient="records")))
    else:
        print(text)
    log = logging.getLogger("speechbench")
    log.info("wrote %s, %s and %s", args.out, units_path(args.out), long_csv_path(args.out))
    if args.report:
        log.info("wrote the report %s and %s", Path(args.report) / "index.html", Path(args.report) / "leaderboard.md")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from speechbench.leaderboard.compare import compare, comparisons_to_records, format_comparisons

    comparisons = compare(args.upstreams, args.results, resamples=args.resamples, seed=args.seed, alpha=args.alpha)
    if args.json:
        _print_json(comparisons_to_records(comparisons))
    else:
        print(format_comparisons(comparisons, args.resamples, args.seed, alpha=args.alpha))
    return 0


def cmd_rerun(args: argparse.Namespace) -> int:
    from speechbench.benchmark.rerun import format_rerun, rerun
    from speechbench.runtime import dist_env

    _set_threads()
    outcome = rerun(args.result, out_dir=args.out, trust_checkpoint=args.trust_checkpoint, resamples=args.resamples,
                    device=args.device)
    if dist_env().rank:  # under torchrun, rank 0 prints
        return 0
    if args.json:
        _print_json(outcome)
    else:
        print(format_rerun(outcome))
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from speechbench.benchmark.extract import extract_features, load_inputs
    from speechbench.runtime import make_runtime
    from speechbench.upstreams.registry import build_upstream

    _set_threads()
    runtime = make_runtime(args.device, args.precision)
    utts, root = load_inputs(args.data, args.audio_root)
    upstream = build_upstream(args.upstream, ckpt=args.ckpt, trust_checkpoint=args.trust_checkpoint)
    summary = extract_features(upstream, utts, root, args.out, dtype=args.dtype, max_batch_s=args.max_batch_s,
                               runtime=runtime)
    if runtime.dist.main:
        print(f"extracted {summary.written} utterances ({summary.audio_seconds:.1f} s of audio, "
              f"{summary.speed:.1f}x real time on {runtime.device}, {runtime.precision}), {summary.skipped} already "
              f"done -> {args.out}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    import time

    from speechbench.benchmark.cache import cache_root
    from speechbench.benchmark.cache_admin import human_bytes, list_caches, parse_age, prune

    if args.cache_command == "prune":
        summary = prune(older_than_s=parse_age(args.older_than) if args.older_than else None,
                        upstream=args.upstream, everything=args.all, dry_run=args.dry_run)
        if args.json:
            _print_json(summary.record())
        else:
            verb = "would remove" if args.dry_run else "removed"
            print(f"{verb} {summary.shards} shards ({summary.utterances} utterances) and {summary.folders} folders: "
                  f"{human_bytes(summary.bytes)} from {cache_root()}")
        return 0
    caches = list_caches()
    if args.json:
        total = sum(c["bytes"] for c in caches)
        _print_json(caches if args.cache_command == "ls" else {"upstreams": [
            {k: c[k] for k in ("key", "name", "bytes")} for c in caches], "total_bytes": total})
        return 0
    now = time.time()
    for c in caches:
        size = human_bytes(c["bytes"])
        if args.cache_command == "du":
            print(f"{size:>10}  {c['key'][:12]}  {c['name']}")
            continue
        labels = f" ({', '.join(c['labels'])})" if c["labels"] and c["labels"] != [c["name"]] else ""
        days = (now - c["last_used"]) / 86400
        print(f"{c['key'][:12]}  v{c['version']}  {c['name']}{labels}  {c['precision'] or '-'}  "
              f"pooled {c['pooled_utterances']}, frames {c['frames_utterances']} utterances  {c['shards']} shards  "
              f"{size}  last used {days:.1f} d ago")
    if args.cache_command == "du":
        print(f"{human_bytes(sum(c['bytes'] for c in caches)):>10}  total  {cache_root()}")
    elif not caches:
        print(f"no cached features in {cache_root()}")
    return 0


def cmd_check_upstream(args: argparse.Namespace) -> int:
    from speechbench.benchmark.check_upstream import run_check

    _set_threads()
    ok = run_check(args.upstream, ckpt=args.ckpt, trust_checkpoint=args.trust_checkpoint, long_seconds=args.seconds)
    return 0 if ok else 1


def cmd_pretrain(args: argparse.Namespace) -> int:
    import shlex

    from speechbench.benchmark.config import ConfigError
    from speechbench.benchmark.pretrain import run_pretrain

    _set_threads()
    if args.model == "hubert" and args.iteration == 2 and not args.teacher:
        raise ConfigError("--iteration 2 needs --from DIR (the iteration-1 upstream, e.g. OUT/upstream)")
    from speechbench.runtime import dist_env

    summary = run_pretrain(args.model, args.out, recipe=args.recipe, data=args.data,
                           overrides=tuple(args.overrides), iteration=args.iteration, teacher=args.teacher,
                           command=shlex.join(["bench", *args.argv]), device=args.device, precision=args.precision)
    if dist_env().rank:
        return 0
    print(f"pretrained {args.model}: step {summary.steps}, loss {summary.final_loss:.4f}, "
          f"{summary.audio_s_per_s:.1f} audio s per wall s -> {summary.upstream_dir}")
    return 0


def _list_items(what: str) -> list[dict]:
    """The rows ``bench list WHAT`` prints: one dict per item (the ``--json`` output)."""
    if what == "upstreams":
        from speechbench.upstreams.registry import list_upstreams

        return [{"name": e.name, "summary": e.summary.strip(), "needs_weights": e.needs_weights,
                 "params_m": e.params_m, "gflops_per_s": e.gflops_per_s} for e in list_upstreams()]
    if what == "families":
        from speechbench.upstreams.families import list_families

        return [{"name": f.name, "title": f.title, "summary": f.summary, "hf_model_type": f.hf_model_type,
                 "pretrain": f.pretrain} for f in list_families()]
    if what == "tasks":
        from speechbench.downstreams.tasks import list_tasks

        return [{"name": t.name, "summary": t.summary, "metric": t.metric, "unit": t.unit,
                 "higher_is_better": t.higher_is_better, "granularity": t.granularity,
                 "real_corpus": t.real_corpus, "folds": list(t.folds)} for t in list_tasks()]
    from speechbench.benchmark.config import find_recipe, list_recipes, load_raw_recipe

    return [{"name": n, "description": load_raw_recipe(find_recipe(n)).get("description", "")} for n in list_recipes()]


def cmd_list(args: argparse.Namespace) -> int:
    items = _list_items(args.what)
    if args.json:
        _print_json(items)
        return 0
    for item in items:
        if args.what == "upstreams":
            lines = item["summary"].splitlines() or [""]
            print(f"{item['name']:<18} {lines[0]}")
            for line in lines[1:]:
                print(f"{'':<18} {line.strip()}")
        elif args.what == "families":
            extra = (f"; HF model_type {item['hf_model_type']}" if item["hf_model_type"] else "") + \
                    ("; bench pretrain --model " + item["name"] if item["pretrain"] else "")
            print(f"{item['name']:<14} {item['title']}: {item['summary']}{extra}")
        elif args.what == "tasks":
            direction = "higher is better" if item["higher_is_better"] else "lower is better"
            print(f"{item['name']:<5} {item['summary']} [{item['metric']}, {item['unit']}, {direction}; "
                  f"real corpus: {item['real_corpus']}]")
        else:
            print(f"{item['name']:<16} {item['description']}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from speechbench.downstreams.synth.corpus import generate_corpus

    out = generate_corpus(args.out, profile=args.profile, seed=args.seed)
    print(f"wrote the {args.profile} synthetic corpus (seed {args.seed}) to {out}")
    if args.format == "hf":
        from speechbench.downstreams.synth.export import export_hf

        folders = export_hf(out)
        print(f"wrote {len(folders)} Hugging Face datasets to {out / 'hf'} ({', '.join(folders)}; "
              f"--data-root hf:{out / 'hf'}/<task>)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging(args.verbose)
    from speechbench.common import SpeechbenchError
    from speechbench.runtime import shutdown_distributed

    handlers = {"run": cmd_run, "leaderboard": cmd_leaderboard, "list": cmd_list, "data": cmd_data,
                "extract": cmd_extract, "check-upstream": cmd_check_upstream, "pretrain": cmd_pretrain,
                "compare": cmd_compare, "rerun": cmd_rerun, "sweep": cmd_sweep, "cache": cmd_cache}
    try:
        return handlers[args.command](args)
    except SpeechbenchError as e:  # the user's input is wrong: one line (any other exception is a bug: traceback)
        if args.verbose:
            traceback.print_exc()
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`bench list upstreams | head`): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # keep Python's exit-time flush from failing again
        return 0
    finally:
        shutdown_distributed()  # a torchrun job's process group, if the command started one


if __name__ == "__main__":
    sys.exit(main())
