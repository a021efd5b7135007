"""The Slurm executor of ``bench sweep``, through submitit (``pip install 'speechbench[slurm]'``).

The jobs of a sweep go to Slurm as one job array (:meth:`submitit.SlurmExecutor.submit_array`), with the partition,
time, GPUs, CPUs and memory of :class:`SlurmConfig`. Each array task runs :class:`SlurmJobCall`, which submitit
pickles: on preemption or when the time limit nears (Slurm sends ``USR2`` ``signal_delay_s`` before it), submitit
calls its ``checkpoint`` and requeues the same job; the rerun finds the run directories and resumes training from
their last checkpoints and the features from the cache. Job states come from submitit (``sacct``) while our state
file says pending or running.

submitit is imported only here and only when the slurm executor is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from speechbench.common import SpeechbenchError

log = logging.getLogger("speechbench")

# sacct states of a job that ended without finishing (https://slurm.schedmd.com/sacct.html#SECTION_JOB-STATE-CODES)
FAILED_SLURM_STATES = ("BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                       "REVOKED", "SPECIAL_EXIT", "TIMEOUT")


@dataclass(frozen=True)
class SlurmConfig:
    """The ``slurm:`` section of a sweep file: the resources of each job of the array."""

    partition: str | None = None
    time_min: int = 240  # time limit per job, minutes (a job that reaches it is requeued and resumes)
    cpus_per_task: int = 4  # also the job's torch threads
    gpus_per_node: int = 0
    mem_gb: float | None = None
    array_parallelism: int = 64  # jobs of the array running at the same time
    signal_delay_s: int = 120  # Slurm warns the job this long before its time limit, so it can requeue itself
    max_requeues: int = 3  # time-outs after which a job is not requeued again (preemptions do not count)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: tuple[str, ...] = ()  # shell lines run before the job (module load ..., source .venv/bin/activate)


def failed_slurm_state(state: str) -> bool:
    """Whether a sacct state (``CANCELLED by 0``, ``TIMEOUT``, ...) means the job ended without finishing."""
    return bool(state) and state.split()[0] in FAILED_SLURM_STATES


def sbatch_parameters(cfg: SlurmConfig, name: str) -> dict:
    """submitit's SlurmExecutor parameters (sbatch options) for a sweep's jobs."""
    params: dict = {"job_name": f"sweep-{name}", "time": cfg.time_min, "cpus_per_task": cfg.cpus_per_task,
                    "array_parallelism": cfg.array_parallelism, "signal_delay_s": cfg.signal_delay_s}
    if cfg.mem_gb is not None:
        params["mem"] = f"{int(cfg.mem_gb)}GB" if float(cfg.mem_gb).is_integer() else f"{int(cfg.mem_gb * 1024)}MB"
    if cfg.gpus_per_node:
        params["gpus_per_node"] = cfg.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(cfg, key) is not None:
            params[key] = getattr(cfg, key)
    if cfg.setup:
        params["setup"] = list(cfg.setup)
    return params


def _executor(folder: Path, cfg: SlurmConfig, name: str, script_only: bool = False):
    try:
        from submitit import SlurmExecutor
    except ImportError:
        raise SpeechbenchError("the slurm executor needs submitit: pip install 'speechbench[slurm]'") from None

    class ScriptOnlyExecutor(SlurmExecutor):
        """Writes the sbatch script without a cluster (submitit's own executor requires ``srun`` on PATH)."""

        @classmethod
        def affinity(cls) -> int:
            return 2

    if not script_only and shutil.which("sbatch") is None:
        raise SpeechbenchError("--executor slurm: sbatch not found on PATH (run on a Slurm login node; --dry-run "
                               "shows the script without one)")
    executor = (ScriptOnlyExecutor if script_only else SlurmExecutor)(folder=folder,
                                                                      max_num_timeout=cfg.max_requeues)
    executor.update_parameters(**sbatch_parameters(cfg, name))
    return executor


def sbatch_script(folder: Path, sweep, num_jobs: int) -> str:
    """The sbatch script submitit would submit for ``num_jobs`` jobs of the sweep (an array when more than one),
    made by submitit's own executor without submitting it (submitit has no public dry-run)."""
    executor = _executor(folder, sweep.slurm, sweep.name, script_only=True)
    if num_jobs > 1:
        executor.parameters["map_count"] = num_jobs  # what submitit sets when it submits an array
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


class SlurmJobCall:
    """One sweep job as a Slurm array task: picklable (two strings), and checkpointable: submitit calls
    :meth:`checkpoint` on preemption or near the time limit, then requeues the job."""

    def __init__(self, directory: str, job_id: str):
        self.directory, self.job_id = str(directory), job_id
        self._counter = None

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "job_id": self.job_id}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], state["job_id"])

    def __call__(self) -> dict:
        import submitit

        from speechbench.benchmark.sweep import FeatureCounter, run_job, setup_job_process

        setup_job_process(threads=os.environ.get("SLURM_CPUS_PER_TASK"))
        env = submitit.JobEnvironment()
        self._counter = FeatureCounter()
        return run_job(Path(self.directory), self.job_id, log_path=str(env.paths.stderr), counter=self._counter,
                       slurm_job_id=env.job_id)

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        from speechbench.benchmark.sweep import end_attempt

        end_attempt(Path(self.directory), self.job_id, "requeued", self._counter, state="pending")
        log.info("job %s: preempted or near its time limit; requeued (the rerun resumes)", self.job_id)
        return DelayedSubmission(SlurmJobCall(self.directory, self.job_id))


def submit_jobs(directory: Path, sweep, jobs: list) -> dict:
    """Submit the jobs as one array; record each one's Slurm job id in its state file; return {job id: SlurmJob}."""
    from speechbench.benchmark.sweep import update_state

    executor = _executor(directory / "slurm", sweep.slurm, sweep.name)
    submitted = executor.submit_array([SlurmJobCall(str(directory), job.job_id) for job in jobs])
    for job, slurm_job in zip(jobs, submitted, strict=True):
        update_state(directory, job.job_id, state="pending", error=None, slurm_job_id=slurm_job.job_id)
    array = submitted[0].job_id.split("_")[0]
    log.info("submitted %d job(s) to Slurm as job %s (files: %s)", len(jobs), array, directory / "slurm")
    return {job.job_id: s for job, s in zip(jobs, submitted, strict=True)}


def attach_jobs(directory: Path, slurm_job_ids: dict[str, str]) -> dict:
    """{job id: SlurmJob} for jobs submitted earlier (by another ``bench sweep``), to wait for them."""
    from submitit import SlurmJob

    return {job_id: SlurmJob(folder=directory / "slurm", job_id=s) for job_id, s in slurm_job_ids.items()}


def wait_for_jobs(directory: Path, submitted: dict, poll_s: float = 2.0) -> None:
    """Wait until every submitted job has ended (done, failed, cancelled or out of requeues), logging each."""
    from speechbench.benchmark.sweep import read_state
    from speechbench.runtime import Progress

    left = dict(submitted)
    log.info("waiting for %d Slurm job(s); Ctrl-C stops waiting, not the jobs (bench sweep FILE --status)",
             len(left))
    with Progress(len(left), f"sweep {Path(directory).name} (slurm)", "job", interval_s=0) as bar:
        while left:
            for job_id, slurm_job in list(left.items()):
                if slurm_job.done():
                    del left[job_id]
                    state = read_state(directory, job_id) or {}
                    detail = state.get("error") or f"{len(state.get('results', []))} results"
                    log.info("job %s (slurm %s) %s: %s", job_id, slurm_job.job_id, state.get("state"), detail)
                    bar.update(1)
            if left:
                time.sleep(poll_s)


def slurm_log(folder: Path, slurm_job_id: str) -> Path | None:
    """submitit's stderr file of a job (where a job that died before speechbench started says why)."""
    try:
        from submitit.core.utils import JobPaths
    except ImportError:
        return None
    return JobPaths(folder, job_id=slurm_job_id, task_id=0).stderr


def slurm_states(folder: Path, slurm_job_ids: list[str]) -> dict[str, str]:
    """Slurm's state of each job (``PENDING``, ``RUNNING``, ``COMPLETED``, ``CANCELLED by 0``, ...), read by
    submitit with one ``sacct`` call; ``UNKNOWN`` where Slurm cannot tell (or without submitit)."""
    try:
        from submitit import SlurmJob
    except ImportError:
        return {}
    jobs = [SlurmJob(folder=folder, job_id=i) for i in slurm_job_ids]  # each registers with the shared watcher
    if jobs:
        SlurmJob.watcher.update()  # one sacct call for all of them
    return {job.job_id: SlurmJob.watcher.get_state(job.job_id, mode="cache") for job in jobs}
