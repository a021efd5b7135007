"""``result.json``: one file per run, written atomically; the leaderboard is a view over these files."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from speechbench.common import atomic_write_text

SCHEMA_VERSION = 3  # 3: the protocol fingerprint (benchmark/protocol.py)


def package_versions() -> dict:
    versions = {}
    for dist in ("speechbench", "torch", "transformers", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def git_sha() -> str | None:
    """The commit of the speechbench checkout this code runs from (None for an installed copy)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_result(path: Path, result: dict) -> None:
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=False) + "\n")


def read_result(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
