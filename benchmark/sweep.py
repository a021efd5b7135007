"""``bench sweep``: a grid of evaluations run as jobs, one per (upstream, task, fold) group.

A sweep file (YAML, parsed into :class:`SweepConfig`) or flags name the grid: upstreams x tasks x folds x seeds x
learning rates, plus recipe overrides shared by every job and the run options of ``bench run``. Each
(upstream, task, fold) group is one job that does what ``bench run`` does for all the sweep's learning rates and
seeds in one process (:func:`speechbench.benchmark.run.run`), so the frozen upstream computes each split's features
once and every head trains from them: a job never repeats an upstream pass.

Executors, no scheduler of our own:
- ``local``: each job is its own process (``python -m speechbench.benchmark.sweep job ...``) with its own log file,
  ``--jobs N`` at a time through :mod:`concurrent.futures`, each with ``usable CPUs / N`` torch threads;
- ``slurm``: a submitit job array, requeued on preemption or time-out (see :mod:`speechbench.benchmark.slurm`).

State: ``OUT/.sweep/<sweep hash>/`` holds ``sweep.json`` (the planned jobs), ``<job id>.json`` per job (pending,
running, done or failed with its error line, its attempts and how many splits' features the upstream computed or
the cache supplied), ``logs/`` (local) and ``slurm/`` (submitit's files). The hash covers the grid and the run
options, not the executor: rerunning the same sweep skips its finished jobs, on either executor. When every job is
done, the sweep's leaderboard (its own result.json files only) is written to ``OUT/<name>.leaderboard.csv``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from speechbench.benchmark.config import CACHE_MODES, ConfigError, RuntimeConfig, check_runtime, from_dict
from speechbench.benchmark.slurm import SlurmConfig
from speechbench.common import (
    HF_PREFIX,
    SpeechbenchError,
    atomic_write_text,
    hf_location,
    is_local_hf_location,
    sha256_text,
    usable_cpus,
)
from speechbench.runtime import Progress

log = logging.getLogger("speechbench")

EXECUTORS = ("local", "slurm")
STATES = ("not started", "pending", "running", "done", "failed")


@dataclass(frozen=True)
class SweepConfig:
    """A sweep file. The grid and run options (``GRID_FIELDS``) identify the sweep; the rest says how to run it."""

    name: str | None = None  # names the leaderboard file and the Slurm jobs (default: the sweep file's stem)
    upstreams: tuple[str, ...] = ()  # names, cards or checkpoint paths, as for bench run --upstream
    tasks: tuple[str, ...] = ()  # task names, or "all"
    folds: tuple[int, ...] = ()  # folds of multi-fold tasks (ER); empty: every fold. Tasks without folds ignore it
    seeds: tuple[int, ...] = ()  # training seeds; empty: the recipe's train.seed
    lrs: tuple[float, ...] = ()  # learning rates; empty: the recipe's optim.lr. Best on dev is selected per job
    overrides: tuple[str, ...] = ()  # key.sub=value recipe overrides for every job
    recipe: str | None = None  # recipe name or YAML path; "{task}" is replaced (default: synth/<task> or superb/<task>)
    data_root: str | None = None  # real corpus location; "{task}" is replaced (default: as bench run)
    cache: str | None = None  # feature cache mode: auto | pooled | frames | off (default: the recipe's)
    layer: int | None = None  # probe this single hidden state instead of the weighted sum
    trust_checkpoint: bool = False
    device: str | None = None  # where each job computes: auto | cpu | cuda | cuda:N (default: the recipe's, auto)
    precision: str | None = None  # fp32 | bf16 | fp16 (default: the recipe's, fp32)
    out: str = "results"  # results directory (run directories, the .sweep state folder, the leaderboard)
    executor: str = "local"  # local | slurm
    jobs: int = 1  # local executor: jobs run at the same time
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


GRID_FIELDS = ("upstreams", "tasks", "folds", "seeds", "lrs", "overrides", "recipe", "data_root", "cache", "layer",
               "trust_checkpoint", "out", "precision")  # not the device: where jobs compute is not what they compute


@dataclass(frozen=True)
class SweepJob:
    """One job: every learning rate and seed of the sweep for one (upstream, task, fold)."""

    upstream: str
    task: str
    fold: int | None = None

    @property
    def job_id(self) -> str:
        from speechbench.upstreams.registry import upstream_slug

        parts = [upstream_slug(self.upstream), self.task] + ([f"fold{self.fold}"] if self.fold is not None else [])
        return re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(parts))

    def request(self, sweep: SweepConfig):
        """The :class:`~speechbench.benchmark.run.RunRequest` this job runs."""
        from speechbench.benchmark.run import RunRequest

        return RunRequest(upstream=self.upstream, task=self.task, recipe=_for_task(sweep.recipe, self.task, "recipe"),
                          data_root=_for_task(sweep.data_root, self.task, "data_root"), overrides=sweep.overrides,
                          lrs=sweep.lrs, seeds=sweep.seeds, layer=sweep.layer, cache=sweep.cache, fold=self.fold,
                          out_dir=sweep.out, trust_checkpoint=sweep.trust_checkpoint, device=sweep.device,
                          precision=sweep.precision)


def _for_task(template: str | None, task: str, key: str) -> str | None:
    if template is None:
        return None
    try:
        return template.format(task=task)
    except (KeyError, IndexError, ValueError):
        raise ConfigError(f"sweep {key} {template!r}: the only placeholder allowed is {{task}}") from None


def _unique(values: tuple) -> tuple:
    return tuple(dict.fromkeys(values))


def _absolute(path: str | None, is_path: bool) -> str | None:
    """A local path becomes absolute: jobs may start in another directory, or on another node."""
    return str(Path(path).expanduser().resolve()) if path is not None and is_path else path


def _absolute_root(root: str | None) -> str | None:
    """A data root that names an existing folder, made absolute; ``hf:<folder>`` keeps its prefix, a hub id stays."""
    where = hf_location(root)
    if where is not None:
        return HF_PREFIX + _absolute(where, "{" not in where and is_local_hf_location(where))
    return _absolute(root, root is not None and "{" not in root and Path(root).expanduser().exists())


def _local_paths(sweep: SweepConfig) -> dict:
    """The fields of a sweep that name local paths, made absolute, each read the way ``bench run`` reads it: an
    upstream is a path only when it is no registered name or card; a recipe only when it is an existing YAML file."""
    from speechbench.upstreams.registry import local_upstream_path

    recipe, root = sweep.recipe, sweep.data_root
    return {"upstreams": tuple(_absolute(u, local_upstream_path(u) is not None) for u in sweep.upstreams),
            "recipe": _absolute(recipe, recipe is not None and "{" not in recipe and
                                recipe.endswith((".yaml", ".yml")) and Path(recipe).expanduser().is_file()),
            "data_root": _absolute_root(root),
            "out": _absolute(sweep.out, True)}


# ---------------------------------------------------------------------------------------------------------------
# The sweep file and the plan
# ---------------------------------------------------------------------------------------------------------------


def load_sweep(path: str | None = None, *, overrides: tuple[str, ...] = (), slurm: dict | None = None,
               **changes) -> SweepConfig:
    """Parse a sweep file (or nothing) and apply command-line changes: ``changes`` replace fields (None or ``()``:
    keep the file's), ``overrides`` are appended to the file's, ``slurm`` replaces fields of the slurm section."""
    raw: dict = {}
    where = "sweep"
    if path:
        where = str(path)
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"sweep file {path} not found")
        try:
            raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a sweep file must be a mapping (upstreams, tasks, lrs, ...)")
    sweep = from_dict(SweepConfig, raw, where)
    sweep = dataclasses.replace(
        sweep, **{k: v for k, v in changes.items() if v not in (None, ())},
        overrides=sweep.overrides + tuple(overrides),
        slurm=dataclasses.replace(sweep.slurm, **{k: v for k, v in (slurm or {}).items() if v is not None}))
    return _normalise(sweep, Path(path).stem if path else "sweep", where)


def _normalise(sweep: SweepConfig, default_name: str, where: str) -> SweepConfig:
    if not sweep.upstreams:
        raise ConfigError(f"{where}: no upstreams (the sweep file's upstreams: [...], or --upstream A,B)")
    if not sweep.tasks:
        raise ConfigError(f"{where}: no tasks (the sweep file's tasks: [...], or --task T1,T2)")
    if sweep.executor not in EXECUTORS:
        raise ConfigError(f"{where}: executor must be one of {', '.join(EXECUTORS)}, got {sweep.executor!r}")
    if sweep.cache is not None and sweep.cache not in CACHE_MODES:
        raise ConfigError(f"{where}: cache must be one of {', '.join(CACHE_MODES)}, got {sweep.cache!r}")
    check_runtime(RuntimeConfig(sweep.device or "auto", sweep.precision or "fp32"), where, prefix="")
    if sweep.jobs < 1:
        raise ConfigError(f"{where}: jobs must be at least 1, got {sweep.jobs}")
    if any(lr <= 0 for lr in sweep.lrs):
        raise ConfigError(f"{where}: learning rates must be positive, got {list(sweep.lrs)}")
    name = sweep.name or default_name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ConfigError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' (it names files)")
    tasks = sweep.tasks
    if "all" in tasks:
        from speechbench.downstreams.tasks import list_tasks

        tasks = tuple(t.name for t in list_tasks())
    paths = _local_paths(sweep)
    paths["upstreams"] = _unique(paths["upstreams"])
    return dataclasses.replace(sweep, **paths, name=name, tasks=_unique(tasks), folds=_unique(sweep.folds),
                               seeds=_unique(sweep.seeds), lrs=_unique(sweep.lrs))


def plan_jobs(sweep: SweepConfig) -> list[SweepJob]:
    """One job per (upstream, task, fold). Every task's recipe and overrides are resolved here, so a bad key fails
    before any job starts."""
    from speechbench.benchmark.run import resolve_config
    from speechbench.downstreams.tasks import get_task

    jobs: list[SweepJob] = []
    if sweep.folds and not any(get_task(t).folds for t in sweep.tasks):
        raise ConfigError(f"sweep folds {list(sweep.folds)}: none of the tasks ({', '.join(sweep.tasks)}) has folds")
    for task_name in sweep.tasks:
        task = get_task(task_name)
        folds: list[int | None] = list(task.folds) or [None]
        if sweep.folds and task.folds:
            unknown = [f for f in sweep.folds if f not in task.folds]
            if unknown:
                raise ConfigError(f"sweep folds {unknown}: task {task_name} has folds {list(task.folds)}")
            folds = list(sweep.folds)
        resolve_config(SweepJob(sweep.upstreams[0], task_name).request(sweep), task)
        jobs += [SweepJob(upstream, task_name, fold) for upstream in sweep.upstreams for fold in folds]
    ids = [j.job_id for j in jobs]
    clash = sorted({i for i in ids if ids.count(i) > 1})
    if clash:
        raise ConfigError(f"sweep upstreams give the same job id {clash}: rename or move one checkpoint")
    return jobs


def sweep_hash(sweep: SweepConfig) -> str:
    """12 hex digits of the sha256 of the grid and run options (not of the name or executor settings; the precision
    only when it is not fp32, so sweeps from before it existed keep their state folder)."""
    fields = {k: getattr(sweep, k) for k in GRID_FIELDS}
    if fields["precision"] in (None, "fp32"):
        del fields["precision"]
    return sha256_text(json.dumps(fields, sort_keys=True))[:12]


def state_dir(sweep: SweepConfig) -> Path:
    return Path(sweep.out) / ".sweep" / sweep_hash(sweep)


def leaderboard_path(sweep: SweepConfig) -> Path:
    return Path(sweep.out) / f"{sweep.name}.leaderboard.csv"


def write_plan(sweep: SweepConfig, jobs: list[SweepJob]) -> Path:
    directory = state_dir(sweep)
    atomic_write_text(directory / "sweep.json", json.dumps(
        {"name": sweep.name, "hash": sweep_hash(sweep), "config": dataclasses.asdict(sweep),
         "jobs": [{"id": j.job_id, **dataclasses.asdict(j)} for j in jobs]}, indent=1))
    return directory


def load_plan(directory: Path) -> tuple[SweepConfig, list[SweepJob]]:
    path = Path(directory) / "sweep.json"
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SpeechbenchError(f"{path}: not a sweep state folder ({e.__class__.__name__})") from None
    sweep = from_dict(SweepConfig, plan["config"], str(path))
    return sweep, [SweepJob(j["upstream"], j["task"], j["fold"]) for j in plan["jobs"]]


# ---------------------------------------------------------------------------------------------------------------
# Job state files
# ---------------------------------------------------------------------------------------------------------------


def read_state(directory: Path, job_id: str) -> dict | None:
    try:
        return json.loads((Path(directory) / f"{job_id}.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def update_state(directory: Path, job_id: str, **fields) -> dict:
    """Merge ``fields`` into the job's state file (written atomically; one writer per job at a time)."""
    state = {**(read_state(directory, job_id) or {"job": job_id}), **fields}
    atomic_write_text(Path(directory) / f"{job_id}.json", json.dumps(state, indent=1))
    return state


def end_attempt(directory: Path, job_id: str, outcome: str, counter: FeatureCounter | None = None,
                **fields) -> dict:
    """Close the job's last attempt (outcome, time, feature counts) and merge ``fields`` into its state."""
    from speechbench.benchmark.results import utc_now

    attempts = (read_state(directory, job_id) or {}).get("attempts") or [{}]
    attempts[-1] = {**attempts[-1], "outcome": outcome, "finished": utc_now(),
                    **(counter.counts() if counter else {})}
    return update_state(directory, job_id, attempts=attempts, **fields)


def error_line(error: BaseException) -> str:
    """The one line a failed job reports: the message of a user error, else the exception's type and message."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    text = (str(error).strip().splitlines() or [""])[0]
    return text if isinstance(error, SpeechbenchError) else f"{type(error).__name__}: {text}".rstrip(": ")


def _last_line(path: str | None) -> str:
    try:
        lines = [line.strip() for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except (OSError, TypeError):
        return ""
    return lines[-1] if lines else ""


class FeatureCounter(logging.Handler):
    """Counts what the feature cache did during a job, from the structured stats its log records carry
    (``feature_cache_stats``: one record per split a run asks for): the splits whose features the upstream computed
    (all or some of their utterances), those read whole from the cache, and the utterances extracted.

    Features computed on the fly (``cache=off``) are neither: the upstream then runs at every training step.
    """

    def __init__(self):
        super().__init__(logging.INFO)
        self.computed = self.hits = self.utterances_extracted = 0

    def emit(self, record: logging.LogRecord) -> None:
        stats = getattr(record, "feature_cache_stats", None)
        if stats is None:
            return
        self.utterances_extracted += stats.extracted
        if stats.extracted:
            self.computed += 1
        else:
            self.hits += 1

    def counts(self) -> dict:
        return {"features_computed": self.computed, "features_from_cache": self.hits,
                "utterances_extracted": self.utterances_extracted}


# ---------------------------------------------------------------------------------------------------------------
# One job (in its own process: a local subprocess or a Slurm array task)
# ---------------------------------------------------------------------------------------------------------------


def run_job(directory: Path, job_id: str, log_path: str | None = None, counter: FeatureCounter | None = None,
            slurm_job_id: str | None = None) -> dict:
    """Run one planned job: every learning rate and seed of its (upstream, task, fold), as ``bench run`` does.

    Records the attempt in the job's state file (running, then done with its result files, or failed with the
    error line); when it is the sweep's last job to finish, writes the sweep's leaderboard.
    """
    import torch

    from speechbench.benchmark.results import utc_now
    from speechbench.benchmark.run import run, upstream_results_dir

    directory = Path(directory)
    sweep, jobs = load_plan(directory)
    job = {j.job_id: j for j in jobs}.get(job_id)
    if job is None:
        raise SpeechbenchError(f"{directory}: no job {job_id!r} in this sweep ({len(jobs)} jobs)")
    attempts = (read_state(directory, job_id) or {}).get("attempts", [])
    attempt = {"host": socket.gethostname(), "pid": os.getpid(), "threads": torch.get_num_threads(),
               "started": utc_now(), "log": log_path, "slurm_job_id": slurm_job_id}
    update_state(directory, job_id, state="running", error=None, upstream=job.upstream, task=job.task,
                 fold=job.fold, attempts=[*attempts, attempt])
    counter = counter or FeatureCounter()
    log.addHandler(counter)
    log.info("sweep %s, job %s: %s", sweep.name, job_id, bench_command(job.request(sweep)))
    try:
        rows = run(job.request(sweep))
    except (Exception, KeyboardInterrupt) as error:
        end_attempt(directory, job_id, "failed", counter, state="failed", error=error_line(error))
        raise
    finally:
        log.removeHandler(counter)
    results = [str(upstream_results_dir(Path(sweep.out), r["upstream"]["name"]) / r["task"] / r["run_id"] /
                   "result.json") for r in rows]
    state = end_attempt(directory, job_id, "done", counter, state="done", results=results)
    log.info("job %s done: %d results; features computed by the upstream for %d split(s), read from the cache for "
             "%d", job_id, len(results), counter.computed, counter.hits)
    finish_sweep(directory)
    return state


def bench_command(req) -> str:
    """The ``bench run`` command line equivalent to a job's request (shown in logs and by ``--dry-run``)."""
    argv = ["bench", "run", "--upstream", req.upstream, "--task", req.task]
    for flag, value in (("--recipe", req.recipe), ("--data-root", req.data_root), ("--cache", req.cache),
                        ("--layer", req.layer), ("--fold", req.fold), ("--device", req.device),
                        ("--precision", req.precision)):
        if value is not None:
            argv += [flag, str(value)]
    if req.lrs:
        argv += ["--lr", ",".join(repr(float(v)) for v in req.lrs)]
    if req.seeds:
        argv += ["--seed", ",".join(map(str, req.seeds))]
    if req.trust_checkpoint:
        argv.append("--trust-checkpoint")
    return shlex.join([*argv, "--out", req.out_dir, *req.overrides])


def setup_job_process(threads: str | None = None) -> None:
    """Logging and torch threads for a job's process: ``$SPEECHBENCH_THREADS`` (set by the local executor), else
    ``threads`` (Slurm's CPUs per task), else the usable CPUs."""
    from speechbench.benchmark.cli import _set_threads, _setup_logging

    if threads and not os.environ.get("SPEECHBENCH_THREADS"):
        os.environ["SPEECHBENCH_THREADS"] = threads
    _setup_logging(False)
    _set_threads()


def finish_sweep(directory: Path) -> tuple[Path, str] | None:
    """When every job of the sweep is done, write its leaderboard (its own result.json files only); return its path
    and table text, or None while jobs remain."""
    from speechbench.leaderboard.build import build_leaderboard

    sweep, jobs = load_plan(directory)
    states = [read_state(directory, j.job_id) or {} for j in jobs]
    if not states or any(s.get("state") != "done" for s in states):
        return None
    out = leaderboard_path(sweep)
    text = build_leaderboard([p for s in states for p in s["results"]], out)[2]
    log.info("sweep %s: all %d jobs done; leaderboard %s", sweep.name, len(jobs), out)
    return out, text


# ---------------------------------------------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_statuses(sweep: SweepConfig, jobs: list[SweepJob]) -> list[dict]:
    """Each job's state from its state file, checked against what runs it: a local job whose process is gone is
    failed; a Slurm job's state comes from Slurm (through submitit) while the file says pending or running.

    ``alive`` is True only for a pending or running job confirmed by its process or by Slurm.
    """
    from speechbench.benchmark.slurm import failed_slurm_state, slurm_log, slurm_states

    directory = state_dir(sweep)
    states = {j.job_id: read_state(directory, j.job_id) or {} for j in jobs}
    slurm_ids = {s["slurm_job_id"] for s in states.values() if s.get("slurm_job_id") and
                 s.get("state") in ("pending", "running")}
    slurm = slurm_states(directory / "slurm", sorted(slurm_ids)) if slurm_ids else {}
    out = []
    for job in jobs:
        st = states[job.job_id]
        attempts = st.get("attempts") or []
        last = attempts[-1] if attempts else {}
        status = {"job": job.job_id, "upstream": job.upstream, "task": job.task, "fold": job.fold,
                  "state": st.get("state", "not started"), "error": st.get("error"),
                  "results": st.get("results", []), "attempts": len(attempts), "log": last.get("log"),
                  "slurm_job_id": st.get("slurm_job_id"), "alive": False,
                  "features_computed": sum(a.get("features_computed", 0) for a in attempts),
                  "features_from_cache": sum(a.get("features_from_cache", 0) for a in attempts)}
        if status["state"] in ("pending", "running") and status["slurm_job_id"]:
            slurm_state = slurm.get(status["slurm_job_id"], "UNKNOWN")
            status["slurm_state"] = slurm_state
            status["log"] = status["log"] or str(slurm_log(directory / "slurm", status["slurm_job_id"]) or "")
            if failed_slurm_state(slurm_state):
                last_line = _last_line(status["log"])
                status.update(state="failed", error=f"slurm job {status['slurm_job_id']}: {slurm_state}" +
                              (f"; log: {last_line}" if last_line else ""))
            elif slurm_state.split()[0] in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "CONFIGURING"):
                status.update(state="pending", alive=True)
            elif slurm_state.split()[0] in ("RUNNING", "COMPLETING", "SUSPENDED"):
                status.update(state="running", alive=True)
        elif status["state"] == "running" and last.get("host") == socket.gethostname():
            if _pid_alive(int(last.get("pid", 0))):
                status["alive"] = True
            else:
                last_line = _last_line(status["log"])
                status.update(state="failed", error=f"process {last.get('pid')} ended without a final state" +
                              (f"; log: {last_line}" if last_line else ""))
        out.append(status)
    return out


@dataclass
class SweepReport:
    sweep: SweepConfig
    jobs: list[dict]
    leaderboard: Path | None = None
    table: str = ""  # the leaderboard's text, when this command wrote it
    dry_run: list[str] = field(default_factory=list)  # what --dry-run shows (commands, sbatch script)

    def counts(self) -> dict[str, int]:
        return {s: n for s in STATES if (n := sum(j["state"] == s for j in self.jobs))}

    def to_json(self) -> dict:
        return {"name": self.sweep.name, "hash": sweep_hash(self.sweep), "state_dir": str(state_dir(self.sweep)),
                "counts": self.counts(), "jobs": self.jobs,
                "leaderboard": str(self.leaderboard) if self.leaderboard else None}

    def format(self) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items())
        lines = [f"sweep {self.sweep.name} [{sweep_hash(self.sweep)}]: {len(self.jobs)} jobs: {counts} "
                 f"(state: {state_dir(self.sweep)})"]
        width = max(len(j["job"]) for j in self.jobs)
        for j in self.jobs:
            if j["state"] == "done":
                detail = (f"{len(j['results'])} results; features computed {j['features_computed']}, "
                          f"from cache {j['features_from_cache']}")
            elif j["state"] == "failed":
                detail = j["error"] or ""
            else:
                detail = f"slurm job {j['slurm_job_id']}" if j.get("slurm_job_id") else ""
            lines.append(f"  {j['state']:<11} {j['job']:<{width}}  {detail}".rstrip())
        if self.leaderboard:
            lines.append(f"leaderboard: {self.leaderboard}")
        return "\n".join([*self.dry_run, *lines, *([self.table] if self.table else [])])


def sweep_status(sweep: SweepConfig) -> SweepReport:
    jobs = plan_jobs(sweep)
    board = leaderboard_path(sweep)
    statuses = job_statuses(sweep, jobs)
    done = all(j["state"] == "done" for j in statuses)
    return SweepReport(sweep, statuses, board if done and board.exists() else None)


# ---------------------------------------------------------------------------------------------------------------
# Running a sweep
# ---------------------------------------------------------------------------------------------------------------


def run_sweep(sweep: SweepConfig, dry_run: bool = False, wait: bool = True) -> SweepReport:
    """Plan the jobs, skip finished ones (and ones Slurm still runs), run or submit the rest; with ``wait`` (always
    for the local executor) return when they have ended, leaderboard written if all are done."""
    jobs = plan_jobs(sweep)
    statuses = {s["job"]: s for s in job_statuses(sweep, jobs)}
    todo = [j for j in jobs if statuses[j.job_id]["state"] != "done" and not statuses[j.job_id]["alive"]]
    skipped = len(jobs) - len(todo)
    log.info("sweep %s: %d jobs, %d learning rate(s) x %d seed(s) each; %d to run%s", sweep.name, len(jobs),
             max(1, len(sweep.lrs)), max(1, len(sweep.seeds)), len(todo),
             f", {skipped} done or still running" if skipped else "")
    if dry_run:
        return SweepReport(sweep, list(statuses.values()), dry_run=_dry_run_text(sweep, todo))
    directory = write_plan(sweep, jobs)
    if sweep.executor == "local":
        if todo:
            run_local(directory, todo, sweep.jobs)
    else:
        from speechbench.benchmark.slurm import attach_jobs, submit_jobs, wait_for_jobs

        queued = attach_jobs(directory, {s["job"]: s["slurm_job_id"] for s in statuses.values()
                                         if s["alive"] and s["slurm_job_id"]})  # a rerun waits for these too
        submitted = submit_jobs(directory, sweep, todo) if todo else {}
        if wait and (queued or submitted):
            wait_for_jobs(directory, {**queued, **submitted})
    report = sweep_status(sweep)
    finished = finish_sweep(directory)
    if finished:
        report.leaderboard, report.table = finished
    return report


def _dry_run_text(sweep: SweepConfig, todo: list[SweepJob]) -> list[str]:
    lines = []
    if sweep.executor == "local":
        workers = max(1, min(sweep.jobs, len(todo)))
        lines.append(f"would run {len(todo)} job(s) here, {workers} at a time, "
                     f"{max(1, usable_cpus() // workers)} torch thread(s) each:")
    else:
        lines.append(f"would submit {len(todo)} job(s) as one Slurm job array:")
    lines += [f"  {j.job_id}: {bench_command(j.request(sweep))}" for j in todo]
    if sweep.executor == "slurm" and todo:
        from speechbench.benchmark.slurm import sbatch_script

        lines += ["sbatch script:", sbatch_script(state_dir(sweep) / "slurm", sweep, len(todo)).rstrip(), ""]
    return lines


def run_local(directory: Path, jobs: list[SweepJob], max_jobs: int) -> None:
    """Run the jobs here, ``max_jobs`` at a time, each in its own process with ``usable CPUs / N`` torch threads
    and its own log (``<state>/logs/<job id>.log``)."""
    workers = max(1, min(max_jobs, len(jobs)))
    threads = max(1, usable_cpus() // workers)
    env = {**os.environ, "SPEECHBENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    log.info("local executor: %d job(s), %d at a time, %d torch thread(s) each", len(jobs), workers, threads)
    for job in jobs:
        update_state(directory, job.job_id, state="pending", error=None)
    with ThreadPoolExecutor(workers) as pool, Progress(len(jobs), f"sweep {directory.name}", "job",
                                                       interval_s=0) as bar:
        futures = {pool.submit(_run_local_job, directory, job.job_id, env): job for job in jobs}
        for future in as_completed(futures):
            state = future.result()
            detail = state.get("error") or f"{len(state.get('results', []))} results"
            log.info("job %s %s: %s", futures[future].job_id, state.get("state"), detail)
            bar.update(1)  # with the jobs done so far, their rate and the ETA


def _run_local_job(directory: Path, job_id: str, env: dict) -> dict:
    from speechbench.benchmark.results import utc_now

    log_path = directory / "logs" / f"{job_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(f"=== {utc_now()} sweep job {job_id}, {env['SPEECHBENCH_THREADS']} thread(s)\n")
        f.flush()
        code = subprocess.run([sys.executable, "-m", "speechbench.benchmark.sweep", "job", str(directory), job_id,
                               "--log", str(log_path)], stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              env=env, check=False).returncode
    state = read_state(directory, job_id) or {}
    if code != 0 and state.get("state") != "failed":  # died before it could say why (killed, crashed at start)
        state = update_state(directory, job_id, state="failed", error=f"exit code {code}: {_last_line(log_path)}")
    return state


def main(argv: list[str] | None = None) -> int:
    """``python -m speechbench.benchmark.sweep job STATE_DIR JOB_ID``: one job of a planned sweep (what the local
    executor starts; ``bench sweep`` is the command for people)."""
    parser = argparse.ArgumentParser(prog="python -m speechbench.benchmark.sweep",
                                     description="Run one job of a sweep planned by bench sweep.")
    parser.add_argument("command", choices=["job"])
    parser.add_argument("state_dir", help="the sweep's state folder, OUT/.sweep/<hash>")
    parser.add_argument("job_id")
    parser.add_argument("--log", help="this job's log file, recorded in its state")
    args = parser.parse_args(argv)
    setup_job_process()
    try:
        run_job(Path(args.state_dir), args.job_id, log_path=args.log)
    except SpeechbenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
