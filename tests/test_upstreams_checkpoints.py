"""Safe loading, format detection errors, cards, hub ids offline, the s3prl bridge."""

import datetime
import importlib.util
import os

import pytest
import torch
from helpers import error_line, tiny_apc

from speechbench.benchmark.cli import main
from speechbench.upstreams.apc import apc_s3prl_checkpoint
from speechbench.upstreams.checkpoints import CheckpointError, UnsafeCheckpointError, safe_torch_load
from speechbench.upstreams.registry import UnknownUpstreamError, build_upstream, list_upstreams, load_cards


class Exploit:
    """Unpickling this runs a shell command (the attack a weights_only loader must stop)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def _one_line(message: str) -> str:
    assert "\n" not in message, message
    return message


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = apc_s3prl_checkpoint(tiny_apc())
    ckpt["extra"] = Exploit(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError) as err:
        safe_torch_load(path)
    message = _one_line(str(err.value))
    assert "system" in message and str(path) in message and "--trust-checkpoint" in message
    assert main(["check-upstream", "apc", "--ckpt", str(path)]) == 2
    assert "refusing to unpickle" in capsys.readouterr().err
    assert main(["extract", "--upstream", str(path), "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert not marker.exists()


def test_unlisted_but_trusted_checkpoint_loads_only_with_the_trust_flag(tmp_path):
    ckpt = apc_s3prl_checkpoint(tiny_apc())
    ckpt["saved_on"] = datetime.date(2021, 5, 1)  # a class outside the allow-list
    path = tmp_path / "apc.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(UnsafeCheckpointError, match=r"datetime\.date"):
        build_upstream("apc", ckpt=str(path))
    up = build_upstream("apc", ckpt=str(path), trust_checkpoint=True)
    assert up.num_layers == 3


def test_errors_are_one_line_and_name_the_path(tmp_path):
    torch.save({"weights_of_something": torch.zeros(2)}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError) as err:
        build_upstream(str(tmp_path / "odd.pt"))
    assert "odd.pt: unknown checkpoint layout (top-level: weights_of_something)" in _one_line(str(err.value))
    with pytest.raises(CheckpointError, match=r"missing\.pt: checkpoint not found"):
        build_upstream("hubert", ckpt=str(tmp_path / "missing.pt"))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"text\.pt: not a readable torch checkpoint"):
        build_upstream(str(tmp_path / "text.pt"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CheckpointError, match=r"emptydir: unknown checkpoint directory"):
        build_upstream(str(tmp_path / "emptydir"))
    with pytest.raises(UnknownUpstreamError, match=r"unknown upstream 'nonsense': not a registered name"):
        build_upstream("nonsense")
    with pytest.raises(CheckpointError, match="has no weights, so --ckpt does not apply"):
        build_upstream("fbank", ckpt=str(tmp_path / "odd.pt"))


def test_hub_id_offline_fails_fast_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("SPEECHBENCH_CACHE", str(tmp_path / "sb"))
    for name, expect, todo in (("hubert", "facebook/hubert-base-ls960", "--upstream hubert --ckpt PATH"),
                               ("facebook/wav2vec2-base", "facebook/wav2vec2-base", "HF directory as --upstream PATH"),
                               ("apc", "apc_360hr.ckpt", "--upstream apc --ckpt PATH"),
                               ("cpc", "60k_epoch4-d0f474de.pt", "--upstream cpc --ckpt PATH")):
        with pytest.raises(CheckpointError) as err:
            build_upstream(name)
        message = _one_line(str(err.value))
        assert expect in message and "offline" in message and todo in message, message
    assert main(["check-upstream", "hubert_large"]) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("bench: error: hubert_large: HF hub id facebook/hubert-large-ll60k")


def test_cards_are_listed_with_sources_and_licences(capsys):
    cards = load_cards()
    assert set(cards) >= {"wav2vec2", "wav2vec2_large", "hubert", "hubert_large", "apc", "cpc", "wavlm_base",
                          "wavlm_base_plus", "wavlm_large", "data2vec_base", "data2vec_large", "distilhubert"}
    assert {c.family for c in cards.values()} == {"wav2vec2", "hubert", "wavlm", "data2vec_audio", "distilhubert",
                                                  "apc", "cpc"}
    assert all(c.params_m and c.gflops_per_s for c in cards.values())
    assert all(c.license and c.source for c in cards.values())
    names = [e.name for e in list_upstreams()]
    assert names == sorted(names) and {"fbank", "hubert", "apc"} <= set(names)
    assert main(["list", "upstreams"]) == 0
    out = capsys.readouterr().out
    assert "facebook/hubert-large-ll60k" in out and "fbank_no_cmvn" in out and "microsoft/wavlm-base-plus" in out


@pytest.mark.skipif(importlib.util.find_spec("s3prl") is not None, reason="s3prl is installed")
def test_s3prl_bridge_without_s3prl_says_how_to_install():
    with pytest.raises(CheckpointError) as err:
        build_upstream("s3prl:apc")
    message = _one_line(str(err.value))
    assert "pip install 'speechbench[s3prl]'" in message and "torchaudio <= 2.8" in message


def test_s3prl_bridge_with_s3prl():
    pytest.importorskip("s3prl.nn", reason="s3prl is not importable here")
    from helpers import padded_batch

    up = build_upstream("s3prl:fbank")
    wavs, lengths = padded_batch([8000, 4000])
    with torch.inference_mode():
        out = up(wavs, lengths)
    assert out.hidden.shape[:2] == (2, up.num_layers) and out.hidden.shape[-1] == up.hidden_size
