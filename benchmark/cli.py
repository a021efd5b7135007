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

EPILOG_RUN = """examples:
  bench run --upstream fbank_no_cmvn --task ks                 # synthetic corpus, recipe synth/ks
  bench run --upstream fbank --task ks --lr 1e-2,1e-3,1e-4     # learning-rate search: best on dev, scored on test
  bench run --upstream fbank --task ks --data-root /data/speech_commands_v0.01   # real corpus, recipe superb/ks
  bench run --upstream fbank --task ks train.max_steps=500 optim.lr=1e-3         # recipe overrides
"""


EPILOG_PRETRAIN = """examples:
  bench pretrain --model apc --out ckpts/apc                        # recipe pretrain/apc on the synthetic corpus
  bench pretrain --model cpc --data /data/wavs --out ckpts/cpc       # your own audio (directory or manifest)
  bench pretrain --model hubert --out ckpts/hubert1
  bench pretrain --model hubert --iteration 2 --from ckpts/hubert1/upstream --out ckpts/hubert2
  bench pretrain --model wav2vec2 --out ckpts/w2v train.max_steps=200 optim.lr=1e-3   # recipe overrides
  bench run --upstream ckpts/apc/upstream --task ks                  # evaluate the result
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
    p.add_argument("--json", action="store_true", help="print the result rows as JSON on stdout")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")

    p = sub.add_parser("leaderboard", help="aggregate result.json files into leaderboard CSVs and a table",
                       description="Collect every result.json under RESULTS_DIR; write a wide CSV (one row per "
                                   "upstream and corpus) to --out and a long CSV (one row per result) beside it.")
    p.add_argument("results_dir", help="directory searched recursively for result.json")
    p.add_argument("--out", default="leaderboard.csv", help="wide CSV path; the long CSV is <stem>.long.csv")
    p.add_argument("--reference", default="superb_paper_2021", help="reference set for the SUPERB score")
    p.add_argument("--json", action="store_true", help="print the wide table's rows as JSON on stdout")

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
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--max-batch-s", type=float, default=160.0, help="cap on padded audio seconds per batch")

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
    logger = logging.getLogger("speechbench")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
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

    _set_threads()

    tasks = [t.name for t in list_tasks()] if args.task == "all" else [args.task]
    all_rows = []
    for task in tasks:
        rows = run(RunRequest(upstream=args.upstream, task=task, recipe=args.recipe, data_root=args.data_root,
                              overrides=tuple(args.overrides), lrs=args.lr, seeds=args.seed, layer=args.layer,
                              cache=args.cache, fold=args.fold, out_dir=args.out, rerun=args.rerun,
                              ckpt=args.ckpt, trust_checkpoint=args.trust_checkpoint))
        all_rows += rows
        if args.json:
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
    if args.json:
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


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from speechbench.leaderboard.build import build_leaderboard, long_csv_path

    wide, _, text = build_leaderboard(args.results_dir, args.out, reference=args.reference)
    if args.json:
        _print_json(json.loads(wide.to_json(orient="records")))
    else:
        print(text)
    logging.getLogger("speechbench").info("wrote %s and %s", args.out, long_csv_path(args.out))
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from speechbench.benchmark.extract import extract_features, load_inputs
    from speechbench.upstreams.registry import build_upstream

    _set_threads()
    utts, root = load_inputs(args.data, args.audio_root)
    upstream = build_upstream(args.upstream, ckpt=args.ckpt, trust_checkpoint=args.trust_checkpoint)
    summary = extract_features(upstream, utts, root, args.out, dtype=args.dtype, max_batch_s=args.max_batch_s)
    print(f"extracted {summary.written} utterances ({summary.audio_seconds:.1f} s of audio, "
          f"{summary.speed:.1f}x real time), {summary.skipped} already done -> {args.out}")
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
    summary = run_pretrain(args.model, args.out, recipe=args.recipe, data=args.data,
                           overrides=tuple(args.overrides), iteration=args.iteration, teacher=args.teacher,
                           command=shlex.join(["bench", *args.argv]))
    print(f"pretrained {args.model}: step {summary.steps}, loss {summary.final_loss:.4f}, "
          f"{summary.audio_s_per_s:.1f} audio s per wall s -> {summary.upstream_dir}")
    return 0


def _list_items(what: str) -> list[dict]:
    """The rows ``bench list WHAT`` prints: one dict per item (the ``--json`` output)."""
    if what == "upstreams":
        from speechbench.upstreams.registry import list_upstreams

        return [{"name": e.name, "summary": e.summary.strip(), "needs_weights": e.needs_weights}
                for e in list_upstreams()]
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
            print(f"{item['name']:<10} {item['title']}: {item['summary']}{extra}")
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
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging(args.verbose)
    from speechbench.common import SpeechbenchError

    handlers = {"run": cmd_run, "leaderboard": cmd_leaderboard, "list": cmd_list, "data": cmd_data,
                "extract": cmd_extract, "check-upstream": cmd_check_upstream, "pretrain": cmd_pretrain,
                "cache": cmd_cache}
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


if __name__ == "__main__":
    sys.exit(main())
