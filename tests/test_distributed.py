"""torchrun / DistributedDataParallel on the CPU (gloo, 2 processes): the same steps as one process, exact resume,
cache building shared by the ranks, and the commands under torchrun. All slow: they start processes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

TINY = ["data.profile=tiny", "train.max_steps=30", "train.eval_every=10", "optim.lr=1e-2"]


class Interrupt(Exception):
    pass


def _ddp_worker(rank: int, world: int, store: str, out: str, stop_at: int | None) -> None:
    """One rank of a toy training run (tests/test_train.py's task) under a gloo process group."""
    from test_train import _run

    from speechbench.runtime import Dist, Runtime

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        runtime = Runtime(torch.device("cpu"), "fp32", Dist(rank, world, rank))

        def stop(step: int) -> None:
            if step == stop_at:
                raise Interrupt

        try:
            model, state = _run(Path(out), on_checkpoint=stop, batch_size=7, runtime=runtime)
        except Interrupt:
            return
        torch.save({"model": model.state_dict(), "history": state.history, "best": (state.best_step, state.best_dev)},
                   Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _spawn(tmp_path: Path, name: str, stop_at: int | None = None) -> Path:
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    store = tmp_path / f"store-{name}-{stop_at}"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(store), str(out), stop_at), nprocs=2, join=True)
    return out


def test_ddp_training_matches_one_process_and_resumes_exactly(tmp_path):
    from test_train import _run

    one_model, one_state = _run(tmp_path / "one", batch_size=7)  # 7: the ranks get 4 and 3 of each batch
    two = torch.load(_spawn(tmp_path, "two") / "rank0.pt", weights_only=False)
    other = torch.load(tmp_path / "two" / "rank1.pt", weights_only=False)
    for key, value in two["model"].items():  # the replicas stay identical
        assert torch.equal(value, other["model"][key]), key
    # the same steps as one process, to float rounding: same dev scores, best step, losses and weights
    assert two["best"][0] == one_state.best_step and two["best"][1] == pytest.approx(one_state.best_dev)
    assert [h["dev_accuracy"] for h in two["history"]] == [h["dev_accuracy"] for h in one_state.history]
    assert [h["loss"] for h in two["history"]] == pytest.approx([h["loss"] for h in one_state.history], rel=1e-4)
    for key, value in one_model.state_dict().items():
        torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-5)
    # interrupted after its checkpoint at step 30, then resumed: exactly the uninterrupted two-process run
    _spawn(tmp_path, "cut", stop_at=30)
    assert not (tmp_path / "cut" / "rank0.pt").exists() and (tmp_path / "cut" / "last.pt").exists()
    resumed = torch.load(_spawn(tmp_path, "cut") / "rank0.pt", weights_only=False)
    assert resumed["history"] == two["history"] and resumed["best"] == two["best"]
    for key, value in two["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def _bench(args: list[str], env: dict, nproc: int = 1) -> tuple[subprocess.CompletedProcess, float]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    t0 = time.perf_counter()
    proc = subprocess.run([*launcher, "-m", "speechbench", *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, time.perf_counter() - t0


def test_torchrun_run_matches_one_process(tmp_path, synth_tiny, capsys):
    """`bench run` under torchrun (2 gloo processes, each building half of a fresh feature cache) gives the metric
    and head of one process; the times of both are printed (pytest -s) for the record."""
    base = dict(os.environ, SPEECHBENCH_THREADS="1")
    args = ["run", "--upstream", "apc-synth", "--task", "ks", *TINY, "train.batch_size=7"]
    times = {}
    results = {}
    for nproc in (1, 2):
        env = dict(base, SPEECHBENCH_CACHE=str(tmp_path / f"cache{nproc}"))
        (tmp_path / f"cache{nproc}").mkdir()
        os.symlink(synth_tiny.parent, tmp_path / f"cache{nproc}" / "synth")  # the corpus, not the features
        proc, times[nproc] = _bench([*args, "--out", str(tmp_path / f"out{nproc}"), "--json"], env, nproc)
        (results[nproc],) = json.loads(proc.stdout)
    one, two = results[1], results[2]
    assert two["runtime"]["world_size"] == 2 and two["runtime"]["backend"] == "gloo"
    assert one["runtime"]["world_size"] == 1 and one["runtime"]["device"] == "cpu"
    assert two["value"] == one["value"] and two["best_step"] == one["best_step"]
    assert two["layer_weights"] == pytest.approx(one["layer_weights"], rel=1e-4)
    # each rank extracted its share (its own shard per split), none twice, and no rank read a half-built cache
    for split, stats in two["feature_cache"]["splits"].items():
        assert stats["extracted"] == stats["utterances"] == one["feature_cache"]["splits"][split]["extracted"], split
    shards = {n: len(list((tmp_path / f"cache{n}" / "features").rglob("shards/*.json"))) for n in (1, 2)}
    assert shards == {1: 3, 2: 6}  # train, dev, test: one chunk each, by one process or by each of two
    best = [torch.load(next((tmp_path / f"out{n}").rglob("best.pt")), weights_only=True) for n in (1, 2)]
    for key, value in best[0].items():
        torch.testing.assert_close(best[1][key], value, rtol=1e-4, atol=1e-5)
    assert set(two["resources"]["phases_s"]) == {"data", "cache", "train", "test"}
    with capsys.disabled():
        print(f"\nbench run apc-synth ks (tiny, 30 steps): 1 process {times[1]:.1f} s, 2 gloo processes "
              f"{times[2]:.1f} s (wall, with start-up); test accuracy {one['value']:.2f} both")


def test_torchrun_pretrain_matches_one_process(tmp_path, synth_tiny):
    """APC (a mean loss over equal crops, nothing drawn at random): 2 processes take the steps of one."""
    env = dict(os.environ, SPEECHBENCH_THREADS="1")
    args = ["pretrain", "--model", "apc", "data.profile=tiny", "train.max_steps=6", "train.batch_size=5",
            "train.save_every=3", "train.log_every=1", "train.crop_s=1.0", "model.hidden_size=32",
            "model.num_layers=2"]
    for nproc in (1, 2):
        _bench([*args, "--out", str(tmp_path / f"apc{nproc}")], env, nproc)
    logs = [[json.loads(line) for line in (tmp_path / f"apc{n}" / "log.jsonl").read_text().splitlines()]
            for n in (1, 2)]
    assert [r["step"] for r in logs[1]] == [r["step"] for r in logs[0]] == list(range(1, 7))
    assert [r["loss"] for r in logs[1]] == pytest.approx([r["loss"] for r in logs[0]], rel=1e-4)
    states = [torch.load(tmp_path / f"apc{n}" / "state.pt", weights_only=True) for n in (1, 2)]
    for key, value in states[0]["objective"].items():
        torch.testing.assert_close(states[1]["objective"][key], value, rtol=1e-4, atol=1e-5)
    assert len(states[1]["rng_ranks"]) == 2 and (tmp_path / "apc2" / "upstream" / "speechbench.json").is_file()


def test_torchrun_extract_shares_the_files(tmp_path):
    from helpers import write_wav

    for i in range(5):
        write_wav(tmp_path / "wavs" / f"u{i}.wav", 0.5 + 0.3 * i, seed=i)
    env = dict(os.environ, SPEECHBENCH_THREADS="1")
    proc, _ = _bench(["extract", "--upstream", "fbank_no_cmvn", "--data", str(tmp_path / "wavs"), "--out",
                      str(tmp_path / "feats")], env, nproc=2)
    assert proc.stdout.count("extracted 5 utterances") == 1  # rank 0 prints the job's total
    index = [json.loads(line) for line in (tmp_path / "feats" / "index.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in index) == [f"u{i}" for i in range(5)]
    assert len(list((tmp_path / "feats").glob("*.safetensors"))) == 5
