"""The feature cache: one upstream pass per audio file, exact contents, keys that track the audio and the upstream
(never labels or splits), damaged shards rebuilt, concurrent writers, and ``bench cache ls|du|prune``."""

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import error_line

import speechbench.benchmark.cache as cache_mod
from speechbench.benchmark.cache import (
    FeatureStore,
    estimate_frames_bytes,
    store_root,
    upstream_identity,
    upstream_key,
    utterance_key,
)
from speechbench.benchmark.cache_admin import list_caches, parse_age, prune
from speechbench.benchmark.cli import main
from speechbench.benchmark.features import run_upstream
from speechbench.benchmark.run import RunRequest, run
from speechbench.common import SpeechbenchError, sha256_file
from speechbench.downstreams.data import Utterance
from speechbench.downstreams.heads import masked_mean
from speechbench.upstreams.base import UpstreamOutput

SECONDS = [0.5, 1.2, 0.8, 2.0, 0.3]


class HopStats(torch.nn.Module):
    """A tiny deterministic upstream: per 160-sample hop, [mean, std, max, min] and their squares (L=2, D=4).

    ``seen`` counts the utterances it ran over. With ``rendezvous`` (a barrier shared with another process), the
    first call waits there: both processes are then extracting at the same time.
    """

    name, sample_rate, num_layers, hidden_size, downsample_rate = "hopstats", 16000, 2, 4, 160

    def __init__(self, rendezvous=None):
        super().__init__()
        self.calls, self.seen, self.rendezvous = 0, 0, rendezvous

    def forward(self, wavs, wav_lengths):
        self.calls += 1
        self.seen += wavs.shape[0]
        if self.rendezvous is not None and self.calls == 1:
            self.rendezvous.wait(timeout=60)
        t = wavs.shape[1] // 160
        hops = wavs[:, : t * 160].reshape(wavs.shape[0], t, 160)
        first = torch.stack([hops.mean(-1), hops.std(-1), hops.amax(-1), hops.amin(-1)], dim=-1)
        lengths = wav_lengths // 160
        mask = (torch.arange(t)[None] < lengths[:, None])[..., None]
        hidden = torch.stack([first, first**2], dim=1) * mask[:, None]
        return UpstreamOutput(hidden, lengths)


def make_corpus(base, write: bool = True):
    """Five noise wavs under ``base/wavs`` and their utterances (``write=False``: only the utterances)."""
    rng = np.random.default_rng(0)
    utts = []
    for i, seconds in enumerate(SECONDS):
        path = base / "wavs" / f"u{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        if write:
            sf.write(path, (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
        utts.append(Utterance(f"u{i}", f"wavs/u{i}.wav", seconds, "s", "train", {"label": str(i % 2)}))
    return base, utts


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path)


def _ensure(up, utts, root, granularity, cache_dir, label="hopstats"):
    store = FeatureStore.open(up, label, root=cache_dir)
    return store.ensure(up, utts, root, granularity, max_batch_s=2.5, desc="train")


def _direct_means(up, utts, root):
    out = []
    for u in utts:
        hidden, lengths = run_upstream(up, [u], root)
        out.append(torch.stack([masked_mean(hidden[:, layer], lengths)[0] for layer in range(up.num_layers)]))
    return torch.stack(out)


def _sidecars(cache_dir):
    return [json.loads(p.read_text()) for p in sorted(store_root(cache_dir).glob("*/shards/*.json"))]


def test_pooled_entries_equal_direct_masked_means(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "SHARD_UTTERANCES", 2)  # several shards, one partial
    root, utts = corpus
    up = HopStats()
    split = _ensure(up, utts, root, "pooled", tmp_path / "c")
    assert split.stats.record("pooled") == {"utterances": 5, "extracted": 5, "reused": 0,
                                            "pooled_from": {"pooled": 5, "frames": 0}}
    pooled = split.pooled()
    assert pooled.shape == (5, 2, 4) and len(_sidecars(tmp_path / "c")) == 3
    assert torch.allclose(pooled, _direct_means(up, utts, root), atol=1e-6)


def test_frames_entries_match_the_upstream_and_crop(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "SHARD_UTTERANCES", 2)
    root, utts = corpus
    up = HopStats()
    frames = _ensure(up, utts, root, "frames", tmp_path / "c").frames(100.0)
    assert len(frames) == 5 and frames.durations_s == pytest.approx(SECONDS)
    hidden, lengths = frames.get([3, 0])
    assert hidden.shape == (2, 2, 200, 4) and lengths.tolist() == [200, 50]
    direct, _ = run_upstream(up, [utts[3], utts[0]], root)
    assert torch.allclose(hidden, direct, atol=2e-3, rtol=2e-3)  # float16 storage
    cropped = frames.with_crop(60, seed=1)
    a, a_len = cropped.get([3, 0], draw=7)
    b, _ = cropped.get([3, 0], draw=7)
    assert a_len.tolist() == [60, 50] and torch.equal(a, b)  # same draw, same crop
    assert not torch.equal(a, cropped.get([3, 0], draw=8)[0])


def _cat_parts(source, batch, draw):
    """``source.get`` of the two parts a 2-process torchrun job takes, padded to one batch again."""
    parts = [source.get(batch, draw=draw, part=p) for p in (slice(0, 2), slice(2, 3))]
    t = max(h.shape[2] for h, _ in parts)
    return (torch.cat([torch.nn.functional.pad(h, (0, 0, 0, t - h.shape[2])) for h, _ in parts]),
            torch.cat([n for _, n in parts]))


def test_a_ranks_part_of_a_batch_is_cropped_as_the_whole_batch(corpus, tmp_path):
    """Crops are drawn over the whole micro-batch, so the ranks of a torchrun job crop as one process does."""
    from speechbench.benchmark.features import OnTheFlyFeatures

    root, utts = corpus
    up = HopStats()
    frames = _ensure(up, utts, root, "frames", tmp_path / "c").frames(100.0).with_crop(60, seed=1)
    on_the_fly = OnTheFlyFeatures(up, utts, root, crop_s=0.6, seed=1)
    for source in (frames, on_the_fly):
        whole, lengths = source.get([3, 1, 0], draw=5)
        joined, joined_lengths = _cat_parts(source, [3, 1, 0], draw=5)
        assert torch.equal(joined_lengths, lengths) and torch.equal(joined, whole)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_precision_keys_the_cache_and_extraction_runs_on_the_device(corpus, tmp_path, device):
    from speechbench.runtime import Runtime

    root, utts = corpus
    up = HopStats().to(device)
    fp32 = FeatureStore.open(up, "hopstats", root=tmp_path / "c")
    bf16 = FeatureStore.open(up, "hopstats", "bf16", root=tmp_path / "c")
    assert fp32.directory != bf16.directory and bf16.identity["precision"] == "bf16"
    runtime = Runtime(torch.device(device), "bf16")
    got = bf16.ensure(up, utts, root, "frames", max_batch_s=2.5, desc="train", runtime=runtime)
    assert got.stats.extracted == 5 and up.seen == 5
    frames = got.frames(100.0, torch.device(device))
    hidden, lengths = frames.get([3, 0])
    assert hidden.device.type == device and hidden.dtype == torch.float32 and lengths.device.type == device
    reference = fp32.ensure(up, utts, root, "pooled", max_batch_s=2.5, desc="train").pooled()
    assert up.seen == 10  # a fp32 request never reads the bf16 entries
    torch.testing.assert_close(got.pooled(), reference, rtol=2e-2, atol=1e-3)  # bf16: within about 1 %


def test_pooled_requests_reuse_frames_entries_exactly(corpus, tmp_path):
    """Frames entries keep the float32 time-means beside the float16 frames: a pooled request after a frames run
    extracts nothing and gets exactly the means a pooled extraction computes (not the mean of float16 frames)."""
    root, utts = corpus
    up = HopStats()
    _ensure(up, utts, root, "frames", tmp_path / "c")
    seen = up.seen
    from_frames = _ensure(up, utts, root, "pooled", tmp_path / "c")
    assert up.seen == seen and from_frames.stats.record("pooled")["pooled_from"] == {"pooled": 0, "frames": 5}
    pooled_alone = _ensure(up, utts, root, "pooled", tmp_path / "other").pooled()
    assert torch.equal(from_frames.pooled(), pooled_alone)
    frames = from_frames.frames(100.0)
    fp16_means = torch.stack([frames.get([i])[0][0].mean(dim=1) for i in range(5)])
    assert not torch.equal(fp16_means, pooled_alone)  # what "exact" rules out
    # the other way round, pooled entries cannot give frames: those are extracted (once) as frames entries
    _ensure(up, utts, root, "frames", tmp_path / "other")
    assert [m["kind"] for m in _sidecars(tmp_path / "other")].count("frames") == 1


def test_only_missing_utterances_go_through_the_upstream(corpus, tmp_path):
    """Splits, folds and tasks share entries: labels, ids and split names are not part of the key."""
    root, utts = corpus
    up = HopStats()
    _ensure(up, utts[:3], root, "pooled", tmp_path / "c")
    assert up.seen == 3
    relabelled = [dataclasses.replace(u, id=f"other-{u.id}", split="test", labels={"emotion": "hap"})
                  for u in reversed(utts)]
    split = _ensure(up, relabelled, root, "pooled", tmp_path / "c")
    assert up.seen == 5 and (split.stats.extracted, split.stats.reused) == (2, 3)
    assert torch.equal(split.pooled(), _ensure(up, utts, root, "pooled", tmp_path / "c").pooled().flip(0))
    assert up.seen == 5
    assert sorted(k for m in _sidecars(tmp_path / "c") for k in m["keys"]) == sorted(
        utterance_key(u, root, 16000) for u in utts)  # every utterance once, in one shard
    # a copy of the corpus elsewhere: other keys (path mode), the same features (a shard of the same tensors as the
    # first one), its own shard
    shutil.copytree(root / "wavs", tmp_path / "copy" / "wavs")
    copy = _ensure(up, utts[:3], tmp_path / "copy", "pooled", tmp_path / "c")
    assert copy.stats.extracted == 3 and torch.equal(copy.pooled(), split.pooled().flip(0)[:3])
    assert _ensure(up, utts[:3], tmp_path / "copy", "pooled", tmp_path / "c").stats.extracted == 0


def test_utterance_key_tracks_the_audio_and_its_crop(corpus, tmp_path, monkeypatch):
    root, utts = corpus
    u = utts[0]
    key = utterance_key(u, root, 16000)
    assert key == utterance_key(dataclasses.replace(u, id="x", split="dev", speaker="t", labels={"a": 1}), root, 16000)
    assert key == utterance_key(dataclasses.replace(u, path=str(root / u.path)), None, 16000)  # same resolved file
    crop = dataclasses.replace(u, labels={"offset_s": 0.1})
    assert utterance_key(crop, root, 16000) not in (key, utterance_key(dataclasses.replace(
        u, labels={"offset_s": 0.2}), root, 16000))
    copy = tmp_path / "copy.wav"
    shutil.copy(root / u.path, copy)
    copied = dataclasses.replace(u, path=str(copy))
    assert utterance_key(copied, None, 16000) != key  # another path
    assert utterance_key(copied, None, 16000, "content") == utterance_key(u, root, 16000, "content")
    os.utime(root / u.path, ns=(1, 1))  # a touched (maybe rewritten) file is extracted again...
    assert utterance_key(u, root, 16000) != key
    assert utterance_key(u, root, 16000, "content") == utterance_key(copied, None, 16000, "content")  # ...not here
    monkeypatch.setenv("SPEECHBENCH_CACHE_KEY", "sha1")
    with pytest.raises(SpeechbenchError, match="SPEECHBENCH_CACHE_KEY='sha1': expected one of path, content"):
        cache_mod.audio_key_mode()
    with pytest.raises(SpeechbenchError, match="audio file not found"):
        utterance_key(dataclasses.replace(u, path="missing.wav"), root, 16000)


def test_upstream_key_tracks_checkpoint_precision_and_label_only_without_a_checkpoint():
    up = HopStats()
    key = upstream_key(upstream_identity(up, "hopstats"))
    assert key == upstream_key(upstream_identity(HopStats(), "hopstats"))
    assert key != upstream_key(upstream_identity(up, "hopstats-2"))  # no weights hash: the run's label tells apart
    with pytest.raises(ValueError, match="precision"):
        upstream_identity(up, "hopstats", precision="int8")
    up.checkpoint_sha256 = "beef"
    with_weights = upstream_key(upstream_identity(up, "hopstats"))
    assert with_weights != key and with_weights == upstream_key(upstream_identity(up, "./ckpts/same-weights"))
    up.num_layers = 3
    assert upstream_key(upstream_identity(up, "hopstats")) != with_weights


def test_damaged_shards_are_extracted_again(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "SHARD_UTTERANCES", 2)
    root, utts = corpus
    up = HopStats()
    reference = _ensure(up, utts, root, "pooled", tmp_path / "c").pooled()
    shards = sorted(store_root(tmp_path / "c").glob("*/shards/*.safetensors"))
    shard = shards[1]
    shard.write_bytes(shard.read_bytes()[:40])  # an interrupted write
    seen = up.seen
    again = _ensure(up, utts, root, "pooled", tmp_path / "c")
    assert up.seen > seen and again.stats.extracted == up.seen - seen  # the damaged shard's utterances only
    assert torch.equal(again.pooled(), reference)
    assert sha256_file(shard)[:32] == shard.stem  # rewritten: the same bytes, so the same content-addressed name
    target = sorted(store_root(tmp_path / "c").glob("*/shards/*.safetensors"))[0]
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: caught by the checksum
    target.write_bytes(bytes(data))
    seen = up.seen
    assert torch.equal(_ensure(up, utts, root, "pooled", tmp_path / "c").pooled(), reference)
    assert up.seen > seen
    for meta in _sidecars(tmp_path / "c"):  # what is left is intact
        path = next(store_root(tmp_path / "c").glob(f"*/shards/{meta['sha256'][:32]}.safetensors"))
        assert sha256_file(path) == meta["sha256"]


def _extract_in_process(base, cache_dir, barrier, results):
    cache_mod.SHARD_UTTERANCES = 1
    root, utts = make_corpus(base, write=False)  # the parent wrote the files
    up = HopStats(rendezvous=barrier)
    split = _ensure(up, utts, root, "frames", cache_dir)
    frames = split.frames(100.0)
    results.put((split.stats.extracted, up.seen, [frames.get([i])[0].tolist() for i in range(len(utts))]))


def test_two_processes_extracting_the_same_split_at_once(tmp_path):
    """Both processes are inside the upstream at the same time (a barrier in its first call), each holding the lock
    of a different chunk; between them every utterance is extracted exactly once, into intact shards."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    base = tmp_path / "corpus"
    make_corpus(base)
    procs = [ctx.Process(target=_extract_in_process, args=(base, tmp_path / "c", barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    outs = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(o[0] for o in outs) == len(SECONDS) == sum(o[1] for o in outs)  # each utterance extracted once
    assert min(o[0] for o in outs) >= 1  # and both did some of it
    assert outs[0][2] == outs[1][2]
    sidecars = _sidecars(tmp_path / "c")
    keys = [k for m in sidecars for k in m["keys"]]
    assert len(keys) == len(set(keys)) == len(SECONDS)  # no utterance in two shards
    shards = list(store_root(tmp_path / "c").glob("*/shards/*"))
    assert sorted(p.suffix for p in shards) == [".json"] * 5 + [".safetensors"] * 5  # no leftovers
    for meta in sidecars:
        assert sha256_file(next(p for p in shards if p.name == f"{meta['sha256'][:32]}.safetensors")) == meta["sha256"]


def test_frames_size_estimate(corpus):
    _, utts = corpus
    # 100 frames per second (+1 per utterance) x L=2 x D=4 x 2 bytes
    assert estimate_frames_bytes(utts, HopStats()) == (50 + 120 + 80 + 200 + 30 + 5) * 2 * 4 * 2


def test_parse_age():
    assert [parse_age(t) for t in ("30d", "12h", "90m", "45s", "2w", "1.5h")] == [
        30 * 86400, 12 * 3600, 5400, 45, 14 * 86400, 5400]
    for bad in ("30", "d", "-1d", "3 days"):
        with pytest.raises(SpeechbenchError, match="expected a number and a unit"):
            parse_age(bad)


def test_bench_cache_ls_du_prune(corpus, tmp_path, monkeypatch, capsys):
    root, utts = corpus
    cache = tmp_path / "sbcache"
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(cache))
    up = HopStats()
    _ensure(up, utts[:2], root, "pooled", None, label="hop-a")
    _ensure(up, utts[2:], root, "frames", None, label="hop-a")
    _ensure(up, utts[:2], root, "pooled", None, label="hop-b")
    legacy = cache / "features" / ("ab" * 16)  # a folder of the previous layout
    legacy.mkdir(parents=True)
    (legacy / "index.json").write_text(json.dumps({"upstream": {"name": "old"}, "granularity": "pooled",
                                                   "num_utterances": 7}))
    (legacy / "shard-00000.safetensors").write_bytes(b"x" * 1000)
    assert main(["cache", "ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "hopstats (hop-a)" in lines[0] + lines[1] and "v1  old" in lines[2]
    assert any("pooled 2, frames 3 utterances  2 shards" in line for line in lines)
    assert main(["cache", "du", "--json"]) == 0
    du = json.loads(capsys.readouterr().out)
    assert len(du["upstreams"]) == 3 and du["total_bytes"] == sum(u["bytes"] for u in du["upstreams"]) > 1000
    assert main(["cache", "du"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[-1].endswith(f"total  {cache / 'features'}") and "hopstats" in lines[0]
    assert main(["cache", "prune", "--older-than", "1h"]) == 0
    assert capsys.readouterr().out.startswith("removed 0 shards (0 utterances) and 0 folders")
    # make hop-a's pooled shard unused for two days
    a_dir = next(Path(c["path"]) for c in list_caches() if "hop-a" in c["labels"])
    sidecar = next(p for p in (a_dir / "shards").glob("*.json") if json.loads(p.read_text())["kind"] == "pooled")
    os.utime(sidecar, (time.time() - 2 * 86400,) * 2)
    assert main(["cache", "prune", "--older-than", "1d", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("would remove 1 shards (2 utterances)") and sidecar.exists()
    assert main(["cache", "prune", "--older-than", "1d"]) == 0
    assert capsys.readouterr().out.startswith("removed 1 shards (2 utterances) and 0 folders")
    assert not sidecar.exists() and not sidecar.with_suffix(".safetensors").exists()
    seen = up.seen
    _ensure(up, utts, root, "pooled", None, label="hop-a")  # the frames shard still serves 3 of them
    assert up.seen == seen + 2
    assert main(["cache", "prune", "--upstream", "hop-b", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["shards"], summary["utterances"], summary["folders"]) == (1, 2, 1)
    assert main(["cache", "prune", "--upstream", "old"]) == 0 and not legacy.exists()
    capsys.readouterr()
    assert main(["cache", "prune"]) == 2
    assert error_line(capsys.readouterr().err) == \
        "bench: error: bench cache prune needs --older-than D, --upstream U or --all"
    assert main(["cache", "prune", "--all"]) == 0 and list_caches() == []
    assert capsys.readouterr().out.startswith("removed 2 shards (5 utterances) and 1 folders")
    assert main(["cache", "ls"]) == 0 and capsys.readouterr().out.startswith("no cached features in ")


def test_prune_leaves_a_folder_being_written_to(corpus, tmp_path):
    root, utts = corpus
    _ensure(HopStats(), utts, root, "pooled", tmp_path / "c")
    shards = next(store_root(tmp_path / "c").iterdir()) / "shards"
    for p in shards.iterdir():
        os.utime(p, (time.time() - 600,) * 2)
    staging = shards / ".staging-1234.safetensors.tmp"  # another process writing a shard right now
    staging.write_bytes(b"x")
    summary = prune(tmp_path / "c", older_than_s=60)
    assert (summary.shards, summary.utterances, summary.folders) == (1, 5, 0)
    assert staging.exists() and not list(shards.glob("*.json"))


def _extracted(rows):
    return [sum(s["extracted"] for s in r["feature_cache"]["splits"].values()) for r in rows]


@pytest.mark.slow  # seven short training runs
def test_er_folds_and_asr_after_pr_run_the_upstream_once_per_audio_file(tmp_path, synth_tiny, monkeypatch):
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    os.symlink(synth_tiny.parent, tmp_path / "cache" / "synth")  # the session's corpus, in a fresh feature cache
    tiny = ("data.profile=tiny", "train.max_steps=2", "train.eval_every=2")
    er = sorted(run(RunRequest(upstream="fbank_no_cmvn", task="er", overrides=tiny, out_dir=str(tmp_path / "out"))),
                key=lambda r: r["fold"])
    assert _extracted(er) == [120, 0, 0, 0, 0]  # fold 1 covers every utterance; folds 2-5 extract nothing
    assert er[1]["feature_cache"]["splits"]["train"]["reused"] == 77
    assert er[0]["feature_cache"]["pooled"] == cache_mod.POOLED_SOURCE
    (pr,) = run(RunRequest(upstream="fbank_no_cmvn", task="pr", overrides=tiny, out_dir=str(tmp_path / "out")))
    (asr,) = run(RunRequest(upstream="fbank_no_cmvn", task="asr", overrides=tiny, out_dir=str(tmp_path / "out")))
    assert _extracted([pr]) == [28] and _extracted([asr]) == [0]
    assert asr["features"] == pr["features"] == "frames cache (float16)" and "pooled" not in asr["feature_cache"]


def test_dataset_rows_are_keyed_by_their_arrow_file_and_row(tmp_path):
    """A Hugging Face dataset row (``<file>.arrow#<column>:<row>``) is keyed by the Arrow file's identity and the row:
    rows of one file differ, and rewriting the file changes every key."""
    arrow = tmp_path / "train" / "data-00000-of-00001.arrow"
    arrow.parent.mkdir()
    arrow.write_bytes(b"not really arrow: only its identity matters here")
    rows = [Utterance(f"u{k}", f"train/data-00000-of-00001.arrow#audio:{k}", 1.0, "s", "train") for k in range(2)]
    keys = [utterance_key(u, tmp_path, 16000) for u in rows]
    assert keys[0] != keys[1] and keys == [utterance_key(u, tmp_path, 16000) for u in rows]
    os.utime(arrow, ns=(1, 1))
    assert all(a != b for a, b in zip(keys, [utterance_key(u, tmp_path, 16000) for u in rows], strict=True))
