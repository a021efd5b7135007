"""``bench rerun path/to/result.json``: train again exactly the configuration a result records, and say whether the
new value falls inside the original's bootstrap interval.

What is reused: the run's resolved ``config.yaml`` (recipe, overrides, data, learning rate, seed and the task's
options; its sha256 must still be the ``recipe.config_sha256`` of ``result.json``), the upstream (the registered
name or card, the checkpoint path, or the family name with ``--ckpt`` weights), and the fold. The upstream's
checkpoint sha256 must equal the recorded one, else the rerun is refused. The new run goes into a new run directory
``<run id>-r<k>`` beside the original (or under ``--out``), like ``bench run --rerun``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from speechbench.benchmark.config import build_run_config, config_sha256, load_raw_recipe
from speechbench.benchmark.results import read_result
from speechbench.benchmark.run import RunRequest, run, run_dir_for
from speechbench.common import SpeechbenchError
from speechbench.downstreams.tasks import get_task
from speechbench.leaderboard.items import ItemsError, read_items
from speechbench.leaderboard.stats import CONFIDENCE, DEFAULT_SEED, BootstrapError, bootstrap_interval


class RerunError(SpeechbenchError, ValueError):
    """A result that cannot be re-run as recorded (missing files, a config that no longer matches)."""


def _read(path: Path) -> dict:
    if not path.is_file():
        raise RerunError(f"{path}: no such result.json")
    try:
        return read_result(path)
    except (OSError, ValueError) as e:
        raise RerunError(f"{path}: unreadable result ({e.__class__.__name__}: {e})") from None


def rerun_request(result_path: str | Path, out_dir: str | Path | None = None,
                  trust_checkpoint: bool = False) -> tuple[RunRequest, object, dict]:
    """The request and config that reproduce a recorded run -> ``(request, config, original result)``."""
    path = Path(result_path)
    path = path / "result.json" if path.is_dir() else path
    result = _read(path)
    config_path = path.with_name("config.yaml")
    if not config_path.is_file():
        raise RerunError(f"{config_path}: missing; it holds the run's resolved recipe, which a rerun needs")
    task = get_task(result["task"])
    cfg = build_run_config(load_raw_recipe(config_path), task.options_cls, str(config_path))
    recorded = (result.get("recipe") or {}).get("config_sha256")
    if recorded and config_sha256(cfg) != recorded:
        raise RerunError(f"{config_path}: its config sha256 {config_sha256(cfg)[:12]}... is not the "
                         f"{recorded[:12]}... that {path} records (edited, or written by another version)")
    upstream = result["upstream"]
    name, ckpt_path = upstream["name"], upstream.get("path")
    if ckpt_path and "@" in name:  # --upstream FAMILY --ckpt PATH was recorded as FAMILY@<file name>
        upstream_arg, ckpt = name.rsplit("@", 1)[0], ckpt_path
    else:
        upstream_arg, ckpt = ckpt_path or name, None
    # results/<upstream>/<task>/<run id>/result.json: the original's results directory is three levels up
    out = Path(out_dir) if out_dir else path.parent.parent.parent.parent
    req = RunRequest(upstream=upstream_arg, task=task.name, lrs=(cfg.optim.lr,), seeds=(cfg.train.seed,),
                     fold=result.get("fold"), out_dir=str(out), rerun=True, ckpt=ckpt,
                     trust_checkpoint=trust_checkpoint, checkpoint_sha256=upstream.get("checkpoint_sha256"))
    return req, cfg, result


def rerun(result_path: str | Path, out_dir: str | Path | None = None, trust_checkpoint: bool = False,
          resamples: int = 1000, confidence: float = CONFIDENCE, device: str | None = None) -> dict:
    """Re-run a recorded result; return ``{"original", "new", "task", "metric", "unit", "original_value",
    "new_value", "interval", "inside", "result"}`` (``interval``/``inside`` None when the original has no per-item
    scores). ``device`` replaces the recorded one (where a run computes is not part of its identity)."""
    req, cfg, original = rerun_request(result_path, out_dir, trust_checkpoint)
    if device:
        cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, device=device))
    path = Path(result_path)
    path = path / "result.json" if path.is_dir() else path
    interval = None
    try:
        items = read_items(path)
        interval = bootstrap_interval({(original.get("fold"), original.get("seed")): items}, resamples,
                                      DEFAULT_SEED, confidence)
    except (ItemsError, BootstrapError):
        pass  # no interval to check against; the outcome says so
    new_dir = run_dir_for(Path(req.out_dir), req.upstream_label, cfg, req.fold, rerun=True)
    row = run(req, config=cfg)[0]
    value = row["value"]
    return {"original": str(path), "new": str(new_dir / "result.json"), "task": row["task"], "metric": row["metric"],
            "unit": row["unit"], "original_value": original["value"], "new_value": value,
            "interval": list(interval) if interval else None, "confidence": confidence,
            "inside": None if interval is None else bool(interval[0] <= value <= interval[1]), "result": row}


def format_rerun(outcome: dict) -> str:
    """The lines ``bench rerun`` prints."""
    unit = outcome["unit"]
    line = (f"{outcome['task']} {outcome['metric']}: new {outcome['new_value']:.2f} {unit}, original "
            f"{outcome['original_value']:.2f} {unit}")
    if outcome["interval"] is None:
        line += " (the original has no per-item scores, so no interval to check against)"
    else:
        lo, hi = outcome["interval"]
        where = "inside" if outcome["inside"] else "OUTSIDE"
        line += (f" ({100 * outcome['confidence']:g}% interval [{lo:.2f}, {hi:.2f}]): {where} the original's "
                 f"interval")
    return f"rerun of {outcome['original']} -> {outcome['new']}\n{line}"

