"""Remote checkpoint sources: HF hub ids and URLs, cache first, network only when allowed, never hanging.

- An HF hub id (``facebook/hubert-base-ls960``) is looked up in the HF cache first (file system only); when it
  is not there and neither ``HF_HUB_OFFLINE`` nor ``SPEECHBENCH_OFFLINE`` is set, ``config.json``, the optional
  ``preprocessor_config.json`` and the weights (``model.safetensors``, else ``pytorch_model.bin``) are downloaded
  with a short connection timeout. The result is a local HF directory.
- A ``https://huggingface.co/<repo>/resolve/<revision>/<file>`` URL goes through the HF cache the same way; any other
  URL is cached as ``<speechbench cache>/checkpoints/<file name>`` (:func:`speechbench.common.cache_root`),
  downloaded to a temporary file and renamed, and checked against the card's sha256 when known.

Every failure is one line saying what was tried and what to do instead.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from speechbench.common import cache_root, sha256_file
from speechbench.upstreams.checkpoints import CheckpointError

log = logging.getLogger("speechbench")

TIMEOUT_S = 15.0
HF_URL = re.compile(r"https://huggingface\.co/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")
HF_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "SPEECHBENCH_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_hub_id(text: str) -> bool:
    return bool(HF_ID.fullmatch(text)) and not text.startswith((".", "/", "~"))


def cache_dir() -> Path:
    return cache_root("checkpoints")


def _hf_home() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _what_to_do(label: str, is_card: bool) -> str:
    if is_card:
        return (f"fetch it where there is network (or unset HF_HUB_OFFLINE) or pass a local copy: "
                f"--upstream {label} --ckpt PATH")
    return "fetch it where there is network (or unset HF_HUB_OFFLINE) or pass a local HF directory as --upstream PATH"


def unreachable(url: str) -> str | None:
    """Why ``url``'s host cannot be reached (DNS or TCP within 5 s), or None. Skipped behind a proxy."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or (80 if parts.scheme == "http" else 443)
        socket.create_connection((parts.hostname, port), timeout=5.0).close()
    except OSError as e:
        return f"{parts.hostname} is unreachable ({type(e).__name__}: {e})"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__


def _from_hf_cache(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """A file in the HF cache, found by the file system alone. ``hf_hub_download(local_files_only=True)`` builds HTTP
    headers first, and huggingface_hub 2.x then fetches an agent registry from the hub (once per process) unless
    HF_HUB_OFFLINE was set before it was imported: a cache hit, even in our offline mode, would reach the network."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, filename, revision=revision)
    if not isinstance(path, str):  # None (not cached) or the "known not to exist" marker
        raise FileNotFoundError(f"{repo_id}: {filename} is not in the HF cache")
    return Path(path)


def hub_directory(repo_id: str, label: str, is_card: bool = False) -> Path:
    """A local HF directory for a hub id: from the HF cache (no network), else downloaded if allowed."""
    from huggingface_hub import constants, hf_hub_download

    prefix = f"{label}: " if label != repo_id else ""
    missing = f"{prefix}HF hub id {repo_id} is not in the HF cache ({_hf_home()})"

    def get(filename: str, local_only: bool, required: bool = True) -> Path | None:
        try:
            if local_only:
                return _from_hf_cache(repo_id, filename)
            return Path(hf_hub_download(repo_id, filename, etag_timeout=TIMEOUT_S))
        except Exception as e:  # huggingface_hub raises many types (offline, missing entry, HTTP, timeouts)
            if required:
                raise
            log.debug("%s: %s not available (%s)", repo_id, filename, type(e).__name__)
            return None

    for local_only in (True, False):
        if not local_only:
            if offline():
                raise CheckpointError(f"{missing} and offline mode is on (HF_HUB_OFFLINE/SPEECHBENCH_OFFLINE): "
                                      f"looked in the cache only; {_what_to_do(label, is_card)}")
            why = unreachable(constants.ENDPOINT)
            if why:
                raise CheckpointError(f"{missing} and {why}; {_what_to_do(label, is_card)}")
            log.info("%s: not in the HF cache (%s); downloading", repo_id, _hf_home())
        try:
            config = get("config.json", local_only)
            weights = get("model.safetensors", local_only, required=False) or get("pytorch_model.bin", local_only)
            get("preprocessor_config.json", local_only, required=False)
        except Exception as e:
            if local_only:
                continue
            raise CheckpointError(f"{missing} and the download failed ({_first_line(e)}); "
                                  f"{_what_to_do(label, is_card)}") from None
        if config.parent != weights.parent:
            raise CheckpointError(f"{prefix}{repo_id}: config and weights resolved to different snapshots")
        log.info("%s: HF hub id %s %s %s", label, repo_id, "found in the HF cache at" if local_only else
                 "downloaded to", config.parent)
        return config.parent
    raise AssertionError("unreachable")


def _verify(path: Path, sha256: str | None, label: str, downloaded_from: str | None = None) -> None:
    if not sha256:
        return
    digest = sha256_file(path)
    if digest != sha256.lower():
        if downloaded_from:  # the temporary file is deleted: nothing for the user to clean up
            raise CheckpointError(f"{label}: the download of {downloaded_from} has sha256 {digest[:16]}..., "
                                  f"the card expects {sha256[:16]}...; nothing was kept in the cache: the file at "
                                  f"the source differs from the card's (check the card's sha256 and source)")
        raise CheckpointError(f"{label}: {path} has sha256 {digest[:16]}..., the card expects "
                              f"{sha256[:16]}...: delete the file and fetch it again")


def url_file(url: str, label: str, sha256: str | None = None) -> Path:
    """A local copy of a card's checkpoint URL (HF URLs through the HF cache, others through ours)."""
    m = HF_URL.fullmatch(url)
    todo = _what_to_do(label, is_card=True)
    if m:
        from huggingface_hub import hf_hub_download

        repo, revision, filename = m.groups()
        for local_only in (True, False):
            if not local_only:
                if offline():
                    raise CheckpointError(f"{label}: {url} is not in the HF cache ({_hf_home()}) and offline mode is "
                                          f"on: looked in the cache only; {todo}")
                why = unreachable(url)
                if why:
                    raise CheckpointError(f"{label}: {url} is not in the HF cache ({_hf_home()}) and {why}; {todo}")
            try:
                path = (_from_hf_cache(repo, filename, revision) if local_only else
                        Path(hf_hub_download(repo, filename, revision=revision, etag_timeout=TIMEOUT_S)))
            except Exception as e:
                if local_only:
                    continue
                raise CheckpointError(f"{label}: {url} is not in the HF cache and the download failed "
                                      f"({_first_line(e)}); {todo}") from None
            _verify(path, sha256, label)
            return path
    target = cache_dir() / url.rstrip("/").rsplit("/", 1)[-1]
    if target.is_file():
        log.info("%s: using cached %s", label, target)
        _verify(target, sha256, label)
        return target
    if offline():
        raise CheckpointError(f"{label}: {url} is not cached at {target} and offline mode is on; {todo}")
    why = unreachable(url)
    if why:
        raise CheckpointError(f"{label}: {url} is not cached at {target} and {why}; {todo}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        log.info("%s: downloading %s -> %s", label, url, target)
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            expected = response.headers.get("Content-Length", "").strip()
            received = 0
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
                received += len(block)
            # http.client ends a body cut short by a closed connection like a complete one: check the length
            if expected.isdigit() and received != int(expected):
                raise CheckpointError(f"{label}: {url} is not cached at {target} and the download was cut off after "
                                      f"{received} of {expected} bytes (nothing was kept); try again, or {todo}")
            f.flush()
            os.fsync(f.fileno())
        _verify(Path(tmp), sha256, label, downloaded_from=url)
        os.replace(tmp, target)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{label}: {url} is not cached at {target} and the download failed "
                              f"({_first_line(e)}); {todo}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
