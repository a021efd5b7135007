"""Generate and cache the synthetic speech corpus (design section 8): seven SUPERB-like tasks from espeak-ng.

Results on this corpus are a smoke benchmark, not SUPERB numbers.

Layout written under the corpus root (all paths in manifests are relative to it)::

    corpus.json                      name, version, profile, seed, sample_rate, counts, speakers, generation_s
    speakers.json                    every synthetic speaker's synthesis parameters, per task
    wavs/<task>/<id>.wav             16 kHz mono PCM_16
    ks/{train,dev,test}.jsonl        keyword: 10 words, _unknown_, _silence_; 1.0 s clips
    ic/{train,dev,test}.jsonl        action, object, location, text
    er/utterances.jsonl              emotion (neu/hap/ang/sad), fold 1-5, text; split = fold<k>
    sid/{train,dev,test}.jsonl       closed speaker set; label = speaker
    asv/{train,dev,test}.jsonl       train: development speakers; dev/test: trial speakers
    asv/{dev,test}_trials.txt        "label enroll_id test_id" (1 target, 0 nontarget)
    asr/{train,dev,test}.jsonl       text (UPPERCASE), phonemes (space-separated, see phones.PHONE_SET); PR too

Generation is deterministic in ``seed``: the same seed gives byte-identical wavs and manifests whatever the
number of worker processes (only ``generation_s`` in corpus.json differs).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from speechbench.common import SAMPLE_RATE, atomic_write_text, cache_root
from speechbench.downstreams.data import DataError, Utterance, write_manifest
from speechbench.downstreams.synth.espeak import EspeakError
from speechbench.downstreams.synth.phones import PHONE_SET  # noqa: F401  (re-exported: the PR task's symbol inventory)
from speechbench.downstreams.synth.pool import run_chunks
from speechbench.downstreams.synth.render import render_chunk, render_to_file
from speechbench.downstreams.synth.tasks import PLANNERS, TASKS, Job, Plan, Profile, Sizes
from speechbench.downstreams.synth.voices import check_variants

log = logging.getLogger("speechbench.synth")

CORPUS_NAME = "speechbench-synth"
CORPUS_VERSION = 3  # bump whenever the generated audio or manifests change
_CHUNK = 24  # jobs per espeak session: amortises the ~3 ms library reload, keeps work units small
_IN_PROCESS_MAX_JOBS = 600  # below this, spawning workers costs more than it saves

PROFILES: dict[str, Profile] = {
    # a few utterances per class/speaker: every file and field present, for tests (seconds)
    "tiny": Profile(ks=Sizes((4, 8), (2, 6), (2, 6)), ic=Sizes((4, 8), (2, 5), (2, 5)), er=(2, 3),
                    sid=(4, 4, 2, 2), asv=Sizes((4, 3), (4, 3), (4, 3)), asv_trials=(8, 12),
                    asr=Sizes((4, 4), (2, 3), (2, 3))),
    # default runs: ~1 minute on 2 cores
    "small": Profile(ks=Sizes((120, 20), (20, 20), (30, 20)), ic=Sizes((60, 25), (12, 25), (20, 25)),
                     er=(4, 12), sid=(40, 20, 4, 4), asv=Sizes((80, 15), (10, 8), (20, 10)),
                     asv_trials=(300, 1000), asr=Sizes((75, 20), (10, 20), (15, 20))),
    # more speakers and utterances (e.g. for native pretraining); ~4x small
    "medium": Profile(ks=Sizes((480, 20), (40, 20), (60, 20)), ic=Sizes((240, 25), (24, 25), (40, 25)),
                      er=(8, 24), sid=(100, 40, 6, 6), asv=Sizes((300, 15), (20, 10), (40, 10)),
                      asv_trials=(600, 2000), asr=Sizes((300, 20), (20, 20), (30, 20))),
}


def _profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise DataError(f"unknown synthetic corpus profile {profile!r} (choose from {', '.join(PROFILES)})")
    return PROFILES[profile]


def corpus_info(corpus_dir: str | os.PathLike) -> dict:
    """The parsed ``corpus.json`` of a complete corpus; DataError if it is missing or invalid."""
    path = Path(corpus_dir) / "corpus.json"
    if not path.is_file():
        raise DataError(f"{corpus_dir}: not a complete synthetic corpus (no corpus.json; generation interrupted?)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid corpus.json ({e})") from None
    missing = [k for k in ("name", "version", "profile", "seed", "sample_rate", "counts", "speakers")
               if not isinstance(info, dict) or k not in info]
    if missing or info.get("name") != CORPUS_NAME:
        raise DataError(f"{path}: not a {CORPUS_NAME} corpus.json (missing {missing or 'nothing'}, "
                        f"name {info.get('name') if isinstance(info, dict) else None!r})")
    return info


def _is_complete(corpus_dir: Path, profile: str, seed: int) -> bool:
    try:
        info = corpus_info(corpus_dir)
    except DataError:
        return False
    return info["version"] == CORPUS_VERSION and info["profile"] == profile and info["seed"] == seed


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _render_all(root: Path, jobs: list[Job], seed: int, workers: int, progress: bool
                ) -> dict[str, tuple[float, str, dict]]:
    chunks = [(str(root), seed, jobs[i: i + _CHUNK]) for i in range(0, len(jobs), _CHUNK)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="synthesising corpus", unit="utt", file=sys.stderr, leave=False)
    results: dict[str, tuple[float, str, dict]] = {}

    def collect(chunk_results):
        for uid, duration, speech_hash, labels in chunk_results:
            results[uid] = (duration, speech_hash, labels)
        if bar is not None:
            bar.update(len(chunk_results))

    try:
        if workers <= 1 or len(jobs) <= _IN_PROCESS_MAX_JOBS:
            for chunk in chunks:
                collect(render_chunk(chunk))
        else:
            try:
                run_chunks(chunks, workers, collect)
            except RuntimeError as e:
                raise DataError(f"synthetic corpus: {e}") from None
    finally:
        if bar is not None:
            bar.close()
    return results


def _deduplicate(root: Path, jobs: list[Job], seed: int, results: dict) -> int:
    """Re-render (with fresh jitter) any utterance whose clean speech equals an earlier one; returns how many."""
    from dataclasses import replace

    from speechbench.downstreams.synth.espeak import Espeak

    seen: set[str] = set()
    redone = 0
    for job in jobs:
        duration, speech_hash, labels = results[job.id]
        while speech_hash and speech_hash in seen:
            job = replace(job, attempt=job.attempt + 1)
            with Espeak() as tts:  # a fresh session: the re-render does not depend on what ran before
                _, duration, speech_hash, labels = render_to_file(tts, job, seed, root)
            results[job.id] = (duration, speech_hash, labels)
            redone += 1
        seen.add(speech_hash)
    return redone


def _write_task(root: Path, task: str, plan: Plan, results: dict) -> tuple[dict, dict, float]:
    by_split: dict[str, list[Utterance]] = {}
    for job in plan.jobs:
        duration, _, extra = results[job.id]
        by_split.setdefault(job.split, []).append(Utterance(
            job.id, f"wavs/{task}/{job.id}.wav", duration, job.speaker.id, job.split, {**job.labels, **extra}))
    if task == "er":
        write_manifest(root / task / "utterances.jsonl", [u for split in sorted(by_split) for u in by_split[split]])
    else:
        for split, utts in by_split.items():
            write_manifest(root / task / f"{split}.jsonl", utts)
    for split, trials in plan.trials.items():
        atomic_write_text(root / task / f"{split}_trials.txt", "".join(f"{lab} {a} {b}\n" for lab, a, b in trials))
    counts = {split: len(u) for split, u in sorted(by_split.items())}
    speakers = {split: len({x.speaker for x in u}) for split, u in sorted(by_split.items())}
    hours = sum(x.duration_s for u in by_split.values() for x in u) / 3600.0
    return counts, speakers, hours


def _build(root: Path, profile: Profile, profile_name: str, seed: int, tasks: Sequence[str], workers: int,
           progress: bool) -> None:
    start = time.time()
    check_variants()
    plans = {t: PLANNERS[t](profile, seed) for t in tasks}
    jobs = [job for t in tasks for job in plans[t].jobs]
    try:
        results = _render_all(root, jobs, seed, workers, progress)
        redone = _deduplicate(root, jobs, seed, results)
    except EspeakError as e:
        raise DataError(f"synthetic corpus: {e}") from None
    if redone:
        log.info("synthetic corpus: re-rendered %d duplicate utterance(s)", redone)
    info: dict = {"name": CORPUS_NAME, "version": CORPUS_VERSION, "profile": profile_name, "seed": seed,
                  "sample_rate": SAMPLE_RATE, "counts": {}, "speakers": {}, "hours": {}}
    for t in tasks:
        info["counts"][t], info["speakers"][t], hours = _write_task(root, t, plans[t], results)
        info["hours"][t] = round(hours, 4)
    info["note"] = "synthetic espeak-ng speech: a smoke benchmark, not SUPERB numbers; PR uses the asr manifests"
    speakers = {t: [s.to_dict() for s in plans[t].speakers] for t in tasks}
    atomic_write_text(root / "speakers.json", json.dumps(speakers, indent=1) + "\n")
    info["generation_s"] = round(time.time() - start, 2)
    atomic_write_text(root / "corpus.json", json.dumps(info, indent=2) + "\n")  # last: marks the corpus complete


def _generate(out_dir: str | os.PathLike, profile: str | Profile = "small", seed: int = 0, progress: bool = True,
              tasks: Sequence[str] = TASKS, workers: int | None = None, profile_name: str | None = None) -> Path:
    """:func:`generate_corpus` with the knobs tests need: a custom Profile, a subset of tasks, worker count."""
    prof = _profile(profile)
    name = profile_name or (profile if isinstance(profile, str) else "custom")
    unknown = [t for t in tasks if t not in PLANNERS]
    if unknown:
        raise DataError(f"unknown synthetic corpus task(s) {unknown} (choose from {', '.join(TASKS)})")
    out = Path(out_dir).expanduser().absolute()
    if out.exists():
        if _is_complete(out, name, seed) and tuple(tasks) == TASKS:
            log.info("synthetic corpus already complete at %s", out)
            return out
        if not out.is_dir() or any(out.iterdir()):
            raise DataError(f"{out} exists and is not an empty directory (nor a complete {name} corpus with seed "
                            f"{seed}, version {CORPUS_VERSION}); refusing to write into it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _build(tmp, prof, name, seed, tasks, _default_workers() if workers is None else workers, progress)
        try:
            os.rename(tmp, out)  # atomic; replaces `out` only if it is missing or an empty directory
        except OSError:
            if _is_complete(out, name, seed):  # another process finished first: use its corpus
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            raise DataError(f"{out} appeared while generating and is not a complete corpus; refusing to replace "
                            "it") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def generate_corpus(out_dir: str | os.PathLike, profile: str = "small", seed: int = 0, progress: bool = True) -> Path:
    """Synthesise the whole corpus into ``out_dir`` and return its path.

    Builds in a temporary directory beside ``out_dir``, writes ``corpus.json`` last and renames the directory into
    place, so ``out_dir`` is either absent or complete. Refuses (DataError) if ``out_dir`` holds anything but a
    complete corpus of the same profile, seed and version, which is returned as is.
    """
    return _generate(out_dir, profile, seed, progress)


def default_cache_dir() -> Path:
    """``<speechbench cache>/synth`` (see :func:`speechbench.common.cache_root`)."""
    return cache_root("synth")


def _remove_abandoned(cache: Path, name: str) -> None:
    """Delete temporary build dirs of ``name`` left by processes that no longer run (killed mid-generation)."""
    for tmp in cache.glob(f".{name}.*-*-*"):
        try:
            pid = int(tmp.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue


def ensure_corpus(profile: str = "small", seed: int = 0, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> Path:
    """The cached corpus for ``(profile, seed)``, generating it on first use.

    Lives in ``<cache_dir>/<profile>-seed<seed>-v<CORPUS_VERSION>``; ``cache_dir`` defaults to
    :func:`default_cache_dir`. A directory there without a valid corpus.json (an interrupted or damaged
    generation) is discarded and regenerated. Concurrent callers are safe: each builds privately and the first
    atomic rename wins.
    """
    _profile(profile)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = cache / f"{profile}-seed{seed}-v{CORPUS_VERSION}"
    if _is_complete(out, profile, seed):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(cache, out.name)
    if out.exists():
        log.warning("synthetic corpus at %s is incomplete; regenerating it", out)
        stale = cache / f".{out.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(out, stale)  # move aside first (atomic), so no reader ever sees a half-deleted corpus
        except FileNotFoundError:
            pass  # another process moved it already
        shutil.rmtree(stale, ignore_errors=True)
    if progress:
        print(f"generating the {profile} synthetic corpus (seed {seed}) in {out} (once; cached afterwards)",
              file=sys.stderr)
    return _generate(out, profile, seed, progress)


__all__ = ["CORPUS_NAME", "CORPUS_VERSION", "PHONE_SET", "PROFILES", "corpus_info", "default_cache_dir",
           "ensure_corpus", "generate_corpus"]
