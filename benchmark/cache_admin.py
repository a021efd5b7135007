"""``bench cache ls|du|prune``: see and reclaim the feature cache, which outlives runs (see ``benchmark.cache``).

Everything here reads sidecars and file sizes, never shard tensors. Pruning removes a shard's sidecar first (the
shard is then invisible to every reader), then the shard; a run that has the shard memory-mapped keeps reading it
(POSIX), and a later run extracts its utterances again. Feature folders of the previous cache layout (version 1,
keyed by split manifests, never read since version 2) are listed as ``v1`` and pruned like the others.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from speechbench.benchmark.cache import SHARD_FORMAT, cache_root, store_root
from speechbench.common import SpeechbenchError

STALE_TEMP_S = 3600.0  # temporary and sidecar-less files older than this are leftovers of interrupted writes
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """``"30d"``, ``"12h"``, ``"90m"``, ``"45s"``, ``"2w"`` -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not m:
        raise SpeechbenchError(f"--older-than {text!r}: expected a number and a unit s, m, h, d or w (e.g. 30d, 12h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@dataclass
class Shard:
    name: str
    kind: str
    utterances: int
    bytes: int
    last_used: float  # the sidecar's modification time (touched by every run that reads the shard)
    label: str | None = None


@dataclass
class UpstreamCache:
    """One upstream's cache folder."""

    key: str
    path: Path
    version: int
    name: str
    labels: list[str]
    precision: str | None
    shards: list[Shard] = field(default_factory=list)
    other_bytes: int = 0  # upstream.json, locks, leftovers (v1: the whole folder)
    last_used: float = 0.0  # the newest of the shards' last use, upstream.json, lock and temporary files
    legacy_counts: dict[str, int] = field(default_factory=dict)  # v1: utterances per granularity

    @property
    def bytes(self) -> int:
        return self.other_bytes + sum(s.bytes for s in self.shards)

    def utterances(self, kind: str) -> int:
        return sum(s.utterances for s in self.shards if s.kind == kind) + self.legacy_counts.get(kind, 0)

    def record(self) -> dict:
        return {"key": self.key, "path": str(self.path), "version": self.version, "name": self.name,
                "labels": self.labels, "precision": self.precision, "shards": len(self.shards),
                "pooled_utterances": self.utterances("pooled"), "frames_utterances": self.utterances("frames"),
                "bytes": self.bytes, "last_used": self.last_used}

    def matches(self, upstream: str) -> bool:
        """``--upstream``: the upstream's name, a label it ran under, or a prefix (6+ characters) of its key."""
        return upstream in (self.name, *self.labels) or (len(upstream) >= 6 and self.key.startswith(upstream))


def _size(path: Path) -> int:
    with contextlib.suppress(OSError):
        return path.stat().st_size
    return 0


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _v2_cache(directory: Path) -> UpstreamCache:
    meta = _read_json(directory / "upstream.json")
    cache = UpstreamCache(directory.name, directory, 2, meta.get("upstream", {}).get("name", "?"),
                          [meta["label"]] if meta.get("label") else [], meta.get("precision"))
    shard_files = set()
    for sidecar in sorted((directory / "shards").glob("*.json")):
        info = _read_json(sidecar)
        if info.get("format") != SHARD_FORMAT:
            continue
        shard = directory / "shards" / f"{sidecar.stem}.safetensors"
        shard_files.add(shard.name)
        used = sidecar.stat().st_mtime if sidecar.exists() else 0.0
        cache.shards.append(Shard(sidecar.stem, info.get("kind", "?"), len(info.get("keys", [])),
                                  _size(shard) + _size(sidecar), used, info.get("label")))
        if info.get("label") and info["label"] not in cache.labels:
            cache.labels.append(info["label"])
    cache.other_bytes = sum(_size(p) for p in directory.rglob("*") if p.is_file() and p.name not in shard_files
                            and not (p.parent.name == "shards" and p.suffix == ".json"))
    # activity: shards used, locks taken, shards being written (temporary files)
    cache.last_used = max([s.last_used for s in cache.shards] + [_mtime(directory / "upstream.json")]
                          + [_mtime(p) for p in (directory / "locks").glob("*.lock")]
                          + [_mtime(p) for p in (directory / "shards").glob(".*")])
    return cache


def _mtime(path: Path) -> float:
    with contextlib.suppress(OSError):
        return path.stat().st_mtime
    return 0.0


def _v1_cache(directory: Path) -> UpstreamCache:
    index = _read_json(directory / "index.json")
    upstream = index.get("upstream", {})
    cache = UpstreamCache(directory.name, directory, 1, upstream.get("name", "?"), [], None)
    cache.other_bytes = sum(_size(p) for p in directory.rglob("*") if p.is_file())
    cache.last_used = max((_mtime(p) for p in directory.iterdir()), default=0.0)
    cache.legacy_counts = {index.get("granularity", "?"): int(index.get("num_utterances", 0))}
    return cache


def scan(root: Path | None = None) -> list[UpstreamCache]:
    """Every upstream folder of the feature cache (version 2) and every leftover version-1 folder."""
    base = root or cache_root()
    found = []
    v2 = store_root(root)
    if v2.is_dir():
        found += [_v2_cache(d) for d in sorted(v2.iterdir()) if d.is_dir()]
    if base.is_dir():
        found += [_v1_cache(d) for d in sorted(base.iterdir())
                  if d.is_dir() and d != v2 and ((d / "index.json").exists() or any(d.glob("shard-*.safetensors")))]
    return found


def list_caches(root: Path | None = None) -> list[dict]:
    """``bench cache ls``: one record per upstream folder."""
    return [c.record() for c in scan(root)]


@dataclass
class PruneSummary:
    shards: int = 0
    utterances: int = 0
    folders: int = 0  # whole upstream folders removed (v1 folders, and v2 folders left without shards)
    bytes: int = 0
    dry_run: bool = False
    removed: list[str] = field(default_factory=list)

    def record(self) -> dict:
        return asdict(self)


def _remove_leftovers(cache: UpstreamCache, now: float, summary: PruneSummary) -> None:
    """Temporary files of interrupted writes, and shards whose sidecar never came, older than an hour."""
    shards = cache.path / "shards"
    for p in list(shards.glob(".*")) + [p for p in shards.glob("*.safetensors")
                                        if not p.with_suffix(".json").exists()]:
        if now - _mtime(p) > STALE_TEMP_S:
            summary.bytes += _size(p)
            if not summary.dry_run:
                with contextlib.suppress(OSError):
                    p.unlink()


def prune(root: Path | None = None, older_than_s: float | None = None, upstream: str | None = None,
          everything: bool = False, dry_run: bool = False) -> PruneSummary:
    """Remove the shards not used for ``older_than_s`` and/or of ``upstream`` (``everything``: all of them)."""
    if older_than_s is None and upstream is None and not everything:
        raise SpeechbenchError("bench cache prune needs --older-than D, --upstream U or --all")
    now, summary = time.time(), PruneSummary(dry_run=dry_run)
    for cache in scan(root):
        if upstream is not None and not cache.matches(upstream):
            continue
        if cache.version == 1:
            if older_than_s is None or now - cache.last_used > older_than_s:
                summary.folders += 1
                summary.bytes += cache.bytes
                summary.removed.append(str(cache.path))
                if not dry_run:
                    shutil.rmtree(cache.path, ignore_errors=True)
            continue
        _remove_leftovers(cache, now, summary)
        doomed = [s for s in cache.shards if older_than_s is None or now - s.last_used > older_than_s]
        for shard in doomed:
            summary.shards += 1
            summary.utterances += shard.utterances
            summary.bytes += shard.bytes
            summary.removed.append(str(cache.path / "shards" / f"{shard.name}.safetensors"))
            if not dry_run:
                for suffix in (".json", ".safetensors"):  # sidecar first: the shard is then never read again
                    with contextlib.suppress(OSError):
                        (cache.path / "shards" / f"{shard.name}{suffix}").unlink()
        # the folder goes with its last shard, unless it was active (a lock taken, a shard used) since the cut-off
        if len(doomed) == len(cache.shards) and (older_than_s is None or now - cache.last_used > older_than_s):
            summary.folders += 1
            summary.bytes += cache.other_bytes
            if not dry_run:
                shutil.rmtree(cache.path, ignore_errors=True)
    return summary
