"""Device, precision, processes and resources (speechbench.runtime), and how runs record them.

CUDA paths are parametrised with a device that is skipped where torch sees no GPU; everything else runs on the CPU.
"""

import dataclasses
import json
import logging

import pytest
import torch
from helpers import error_line

from speechbench.benchmark.config import RunConfig, RuntimeConfig, config_sha256, config_to_dict, identity_dict
from speechbench.benchmark.run import RunRequest, resolve_config
from speechbench.downstreams.tasks import get_task
from speechbench.runtime import (
    DeviceError,
    Dist,
    Phases,
    Progress,
    Runtime,
    autocast,
    check_precision,
    make_runtime,
    parse_device,
    peak_rss_mb,
    rank_slice,
    resolve_device,
    to_device,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def test_device_specs_resolve_or_fail_in_one_line(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    gpu = torch.cuda.is_available()
    assert resolve_device("auto") == (torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu"))
    assert parse_device("CUDA:1") == ("cuda", 1) and parse_device(None) == ("auto", None)
    with pytest.raises(DeviceError, match=r"expected auto \(CUDA when available\), cpu, cuda or cuda:N"):
        parse_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available") as e:
        resolve_device("cuda:0")
    assert "\n" not in str(e.value) and "--device cpu" in str(e.value)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("command", [["run", "--upstream", "fbank_no_cmvn", "--task", "ks"],
                                     ["extract", "--upstream", "fbank_no_cmvn", "--data", ".", "--out", "never"],
                                     ["pretrain", "--model", "apc", "--out", "never"]])
def test_cuda_without_cuda_is_a_one_line_user_error(command, monkeypatch, capsys, tmp_path):
    from speechbench.benchmark.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--device", "cuda"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "CUDA is not available" in line and "use --device cpu" in line


def test_precisions_and_autocast():
    for p in ("fp32", "bf16"):
        assert check_precision(p, torch.device("cpu")) == p
    with pytest.raises(DeviceError, match="fp32, bf16, fp16"):
        check_precision("int8", torch.device("cpu"))
    with pytest.raises(DeviceError, match="fp16 is for CUDA devices"):
        check_precision("fp16", torch.device("cpu"))
    x = torch.randn(4, 8)
    w = torch.nn.Linear(8, 3)
    with autocast(torch.device("cpu"), "fp32"):
        assert w(x).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert w(x).dtype == torch.bfloat16
    runtime = make_runtime("cpu", "bf16")
    record = runtime.record()
    assert (record["device"], record["precision"], record["world_size"], record["backend"]) == ("cpu", "bf16", 1, None)
    assert record["torch"] == torch.__version__ and record["cuda"] == torch.version.cuda and record["device_name"]


@pytest.mark.parametrize("device", DEVICES)
def test_to_device_moves_tensors_in_lists_and_tuples(device):
    moved = to_device(([torch.ones(2), torch.zeros(1)], torch.arange(3), None), torch.device(device))
    assert moved[0][0].device.type == device and moved[1].device.type == device and moved[2] is None


def test_rank_slices_cover_a_batch_once():
    for n in range(0, 9):
        for world in (1, 2, 3):
            parts = [rank_slice(n, Dist(r, world, r)) for r in range(world)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1
    assert rank_slice(7, Dist(0, 2, 0)) == slice(0, 4) and rank_slice(7, Dist(1, 2, 1)) == slice(4, 7)


def test_phases_and_peak_memory():
    phases = Phases()
    with phases("data"):
        torch.ones(1000).sum()
    with phases("data"):
        pass
    record = phases.record(Runtime())
    assert set(record) == {"phases_s", "peak_rss_mb", "cuda_peak_allocated_mb"}
    assert list(record["phases_s"]) == ["data"] and record["cuda_peak_allocated_mb"] is None
    assert 10 < record["peak_rss_mb"] == pytest.approx(peak_rss_mb(), rel=0.5)  # torch alone takes ~100 MB


def test_progress_logs_rate_and_eta_when_stderr_is_no_terminal(caplog):
    caplog.set_level(logging.INFO, logger="speechbench")
    with Progress(4, "train", "step", interval_s=0) as bar:
        bar.set_postfix(loss="0.5")
        bar.update(2)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("train: 2/4 step (50%)") and "ETA" in lines[0] and "loss 0.5" in lines[0]
    assert "2/4 step" in lines[-1] and " in 0:00:0" in lines[-1]
    caplog.clear()
    with Progress(4, "quiet", "step", interval_s=3600) as bar:
        bar.update(4)
    assert not caplog.records  # a short step says nothing


def test_device_is_not_part_of_a_runs_identity_and_fp32_keeps_old_hashes():
    task = get_task("ks")
    cfg = resolve_config(RunRequest(upstream="fbank", task="ks"), task)
    on_gpu = resolve_config(RunRequest(upstream="fbank", task="ks", device="cuda:1"), task)
    bf16 = resolve_config(RunRequest(upstream="fbank", task="ks", precision="bf16"), task)
    assert on_gpu.runtime == RuntimeConfig("cuda:1", "fp32") and bf16.runtime.precision == "bf16"
    assert config_sha256(on_gpu) == config_sha256(cfg) != config_sha256(bf16)
    # a config from before the runtime section existed hashes as it did then
    import hashlib

    old = config_to_dict(cfg)
    del old["runtime"]
    assert config_sha256(cfg) == hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()
    assert identity_dict(config_to_dict(bf16))["runtime"] == {"precision": "bf16"}


def test_bad_runtime_values_are_config_errors():
    from speechbench.benchmark.config import ConfigError

    task = get_task("ks")
    with pytest.raises(ConfigError, match="runtime.precision must be one of fp32, bf16, fp16"):
        resolve_config(RunRequest(upstream="fbank", task="ks", overrides=("runtime.precision=fp64",)), task)
    with pytest.raises(ConfigError, match="runtime.device 'tpu'"):
        resolve_config(RunRequest(upstream="fbank", task="ks", overrides=("runtime.device=tpu",)), task)


def test_precision_is_a_recorded_deviation_and_the_device_is_not(synth_tiny):
    from speechbench.benchmark.protocol import protocol_record
    from speechbench.benchmark.run import subsample

    task = get_task("ks")
    req = RunRequest(upstream="fbank", task="ks", overrides=("data.profile=tiny",))
    shipped = resolve_config(req, task, shipped=True)
    cfg = resolve_config(dataclasses.replace(req, device="cpu"), task)
    prepared = subsample(task.prepare(cfg.data, cfg.task_options), None)
    fp32 = protocol_record(cfg, shipped, task, prepared, [cfg.optim.lr])
    assert fp32["precision"] == "fp32" and not any("runtime" in d or "precision" in d for d in fp32["deviations"])
    bf16 = protocol_record(dataclasses.replace(cfg, runtime=RuntimeConfig("cpu", "bf16")), shipped, task, prepared,
                           [cfg.optim.lr])
    assert bf16["precision"] == "bf16"
    assert [d for d in bf16["deviations"] if "precision" in d] == [
        "precision bf16: upstream features and head computed under torch.autocast (SUPERB's published numbers are "
        "fp32)"]


def test_run_config_defaults():
    assert RunConfig(task="ks").runtime == RuntimeConfig("auto", "fp32")


def test_runs_record_device_precision_and_resources(tmp_path, synth_tiny, capsys):
    """A bf16 run is another run (id, cache folder) with its precision in result.json and its fingerprint; every
    run records where it computed, its wall time per phase and its peak memory."""
    from speechbench.benchmark.cli import main

    args = ["run", "--upstream", "apc-synth", "--task", "ks", "--out", str(tmp_path), "--json", "--device", "cpu",
            "data.profile=tiny", "train.max_steps=4", "train.eval_every=2"]
    assert main(args) == 0
    (fp32,) = json.loads(capsys.readouterr().out)
    assert main([*args, "--precision", "bf16"]) == 0
    (bf16,) = json.loads(capsys.readouterr().out)
    assert fp32["run_id"] != bf16["run_id"] and fp32["feature_cache"]["key"] != bf16["feature_cache"]["key"]
    assert (fp32["runtime"]["precision"], bf16["runtime"]["precision"]) == ("fp32", "bf16")
    assert bf16["feature_cache"]["precision"] == "bf16" and "bf16-autocast" in bf16["feature_cache"]["pooled"]
    assert fp32["feature_cache"]["pooled"] == "float32 time-means of the float32 upstream output, stored at extraction"
    assert any(d.startswith("precision bf16") for d in bf16["protocol"]["deviations"])
    assert not any(d.startswith("precision") for d in fp32["protocol"]["deviations"])
    assert bf16["cost"]["precision"] == "bf16" and fp32["cost"]["precision"] == "fp32"
    runtime = fp32["runtime"]
    assert (runtime["device"], runtime["world_size"], runtime["backend"], runtime["tf32"]) == ("cpu", 1, None, None)
    assert runtime["torch"] == torch.__version__ and runtime["cuda"] == torch.version.cuda
    resources = fp32["resources"]
    assert set(resources["phases_s"]) == {"data", "cache", "train", "test"}
    assert all(v >= 0 for v in resources["phases_s"].values()) and resources["peak_rss_mb"] > 50
    assert resources["cuda_peak_allocated_mb"] is None


def test_low_precision_weights_give_autocasts_outputs_bitwise_and_restore_the_weights():
    from helpers import padded_batch, tiny_hf_model

    from speechbench.runtime import low_precision_weights
    from speechbench.upstreams.hf import HFUpstream

    up = HFUpstream(tiny_hf_model("hubert", large=False, seed=3), "t", "hubert", normalize=False)
    before = {k: v.clone() for k, v in up.state_dict().items()}
    wavs, lengths = padded_batch([6400, 4100])
    with torch.inference_mode(), autocast(torch.device("cpu"), "bf16"):
        plain = up(wavs, lengths).hidden
        for _ in range(2):  # the second time from the copies made the first time
            with low_precision_weights(up, "bf16"):
                assert up.model.encoder.layers[0].attention.q_proj.weight.dtype == torch.bfloat16
                swapped = up(wavs, lengths).hidden
            assert torch.equal(swapped, plain)
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in up.state_dict().items())
    head = torch.nn.Linear(4, 2)  # trainable: never swapped
    with low_precision_weights(head, "bf16"):
        assert head.weight.dtype == torch.float32
