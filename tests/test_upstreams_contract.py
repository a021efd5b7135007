"""The contract check (``bench check-upstream``) on every kind of upstream, and every upstream in ``bench run``."""

import json

import pytest
import torch
from helpers import tiny_apc, tiny_cpc, tiny_hf_model

from speechbench.benchmark.check_upstream import check_upstream
from speechbench.benchmark.cli import main
from speechbench.upstreams.apc import apc_s3prl_checkpoint
from speechbench.upstreams.base import UPSTREAMS, UpstreamEntry, UpstreamOutput
from speechbench.upstreams.cpc import cpc_s3prl_checkpoint
from speechbench.upstreams.registry import build_upstream

SHORT = "3"  # seconds of the long-input check in the CLI runs below (30 s is exercised in test_check_passes...)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny HF directory (group-norm HuBERT), an s3prl APC and an s3prl CPC checkpoint."""
    base = tmp_path_factory.mktemp("ckpts")
    tiny_hf_model("hubert", large=False, seed=4).save_pretrained(base / "hubert_dir")
    torch.save(apc_s3prl_checkpoint(tiny_apc(4)), base / "apc.ckpt")
    torch.save(cpc_s3prl_checkpoint(tiny_cpc(4)), base / "cpc.pt")
    return {"hf": base / "hubert_dir", "apc": base / "apc.ckpt", "cpc": base / "cpc.pt"}


@pytest.mark.parametrize("name", ["fbank", "fbank_no_cmvn", "mfcc", "hf", "apc", "cpc"])
def test_check_passes_for_every_upstream_kind(name, checkpoints):
    up = build_upstream(str(checkpoints[name]) if name in checkpoints else name)
    results = check_upstream(up, long_seconds=30.0)
    assert [r.name for r in results] == ["attributes", "shapes", "frame counts", "batch invariance", "deterministic",
                                         "30 s input", "finite"]
    assert all(r.ok for r in results), [r.line() for r in results if not r.ok]


def test_cli_prints_pass_lines_and_exit_codes(checkpoints, capsys, monkeypatch):
    assert main(["check-upstream", str(checkpoints["hf"]), "--seconds", SHORT]) == 0
    out = capsys.readouterr().out
    assert "PASS batch invariance" in out and "PASS: 7/7 checks passed" in out
    assert main(["check-upstream", "apc", "--ckpt", str(checkpoints["apc"]), "--seconds", SHORT]) == 0

    class Broken(torch.nn.Module):  # frames padded with the batch, lengths off by one: fails two checks
        name, sample_rate, num_layers, hidden_size, downsample_rate = "broken", 16000, 1, 4, 160

        def forward(self, wavs, wav_lengths):
            t = wavs.shape[1] // 160
            hidden = wavs[:, : t * 160].reshape(wavs.shape[0], 1, t, 160)[..., :4] * wavs.shape[1]
            return UpstreamOutput(hidden, torch.full((wavs.shape[0],), t))

    monkeypatch.setitem(UPSTREAMS, "broken", UpstreamEntry("broken", lambda: Broken(), "test"))
    assert main(["check-upstream", "broken", "--seconds", SHORT]) == 1
    out = capsys.readouterr().out
    assert "FAIL frame counts" in out and "FAIL batch invariance" in out and "failed: frame counts" in out


@pytest.mark.parametrize("kind", ["apc", "cpc", "hf"])
def test_every_upstream_runs_ks_with_weighted_sum_and_single_layer(kind, checkpoints, tmp_path, monkeypatch):
    from test_ks import make_speech_commands

    from speechbench.benchmark.run import RunRequest, run

    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path / "cache"))
    root, _ = make_speech_commands(tmp_path / "data")
    overrides = ("train.max_steps=4", "train.eval_every=2", "train.batch_size=8", "train.log_every=2")
    family = {"apc": "apc", "cpc": "cpc", "hf": "hubert"}[kind]
    for layer in (None, 1):
        rows = run(RunRequest(upstream=family, ckpt=str(checkpoints[kind]), task="ks", data_root=str(root),
                              overrides=overrides, layer=layer, out_dir=str(tmp_path / "results")))
        (row,) = rows
        assert row["upstream"]["name"] == f"{family}@{checkpoints[kind].name}"
        assert row["upstream"]["checkpoint_sha256"] and row["upstream"]["checkpoint_format"] in ("s3prl", "hf-dir")
        assert len(row["layer_weights"]) == build_upstream(str(checkpoints[kind])).num_layers
        assert row["layer"] == layer and 0.0 <= row["value"] <= 100.0
    results = list((tmp_path / "results").rglob("result.json"))
    assert len(results) == 2 and all(json.loads(p.read_text())["task"] == "ks" for p in results)
