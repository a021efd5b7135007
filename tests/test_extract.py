"""``bench extract``: one safetensors file per utterance, resumable, file-safe ids, manifests and directories."""

import json

import pytest
import torch
from helpers import tiny_apc, write_wav

from speechbench.benchmark.cli import main
from speechbench.benchmark.extract import extract_features, load_features, load_inputs, safe_file_name
from speechbench.downstreams.data import DataError, Utterance, load_audio, write_manifest
from speechbench.upstreams.apc import APCUpstream, apc_s3prl_checkpoint
from speechbench.upstreams.registry import build_upstream


def _corpus(root):
    specs = {"spk1/a.wav": 1.3, "spk1/b.wav": 0.6, "spk2/a.flac": 2.1, "c.WAV": 0.9}
    for i, (rel, seconds) in enumerate(specs.items()):
        write_wav(root / rel, seconds, seed=i)
    (root / "notes.txt").write_text("not audio")
    return specs


def test_safe_file_names_are_injective_and_safe():
    ids = ["spk1/utt1", "spk1%2Futt1", "spk1_utt1", "..", ".hidden", "a b:c", "ünï", "x" * 400, "x" * 399 + "y"]
    names = [safe_file_name(i) for i in ids]
    assert len(set(names)) == len(names)
    assert names[0] == "spk1%2Futt1" and names[1] == "spk1%252Futt1"
    assert all("/" not in n and not n.startswith(".") and len(n) <= 180 for n in names)


def test_extract_directory_writes_one_file_per_utterance(tmp_path):
    specs = _corpus(tmp_path / "audio")
    utts, root = load_inputs(tmp_path / "audio")
    assert sorted(u.id for u in utts) == ["c", "spk1/a", "spk1/b", "spk2/a"]
    up = APCUpstream(tiny_apc())
    summary = extract_features(up, utts, root, tmp_path / "out", max_batch_s=3.0, progress=False)
    assert (summary.written, summary.skipped) == (4, 0)
    meta = json.loads((tmp_path / "out" / "upstream.json").read_text())
    assert (meta["num_layers"], meta["hidden_size"], meta["downsample_rate"], meta["dtype"]) == (3, 32, 160, "float32")
    for rel in specs:
        uid = rel.rsplit(".", 1)[0]
        hidden, frames, info = load_features(tmp_path / "out" / f"{safe_file_name(uid)}.safetensors")
        wav = torch.from_numpy(load_audio(tmp_path / "audio" / rel))
        with torch.inference_mode():
            ref = up(wav[None], torch.tensor([wav.shape[0]]))
        assert hidden.shape == (3, int(ref.lengths[0]), 32) and frames == hidden.shape[1]
        assert info["utterance_id"] == uid
        torch.testing.assert_close(hidden, ref.hidden[0], atol=1e-5, rtol=1e-4)
    index = [json.loads(line) for line in (tmp_path / "out" / "index.jsonl").read_text().splitlines()]
    assert {r["id"] for r in index} == {"c", "spk1/a", "spk1/b", "spk2/a"}


def test_extract_resumes_and_refuses_a_different_upstream(tmp_path):
    _corpus(tmp_path / "audio")
    utts, root = load_inputs(tmp_path / "audio")
    up = APCUpstream(tiny_apc())
    extract_features(up, utts, root, tmp_path / "out", progress=False)
    victim = tmp_path / "out" / f"{safe_file_name('spk1/b')}.safetensors"
    victim.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.safetensors")}
    summary = extract_features(up, utts, root, tmp_path / "out", progress=False)
    assert (summary.written, summary.skipped) == (1, 3) and victim.is_file()
    assert all((tmp_path / "out" / n).stat().st_mtime_ns == t for n, t in before.items())
    with pytest.raises(DataError, match="holds features of another upstream or setting"):
        extract_features(APCUpstream(tiny_apc(seed=9)), utts, root, tmp_path / "out", dtype="float16",
                         progress=False)


def test_cli_extract_from_manifest_in_float16(tmp_path, capsys):
    _corpus(tmp_path / "corpus" / "wavs")
    utts = [Utterance("spk1/a", "wavs/spk1/a.wav", 1.3, "spk1", "test"),
            Utterance("odd id", "wavs/spk2/a.flac", 2.1, "spk2", "test")]
    write_manifest(tmp_path / "corpus" / "lists" / "test.jsonl", utts)  # paths relative to the corpus root
    torch.save(apc_s3prl_checkpoint(tiny_apc()), tmp_path / "apc.ckpt")
    args = ["extract", "--upstream", "apc", "--ckpt", str(tmp_path / "apc.ckpt"), "--data",
            str(tmp_path / "corpus" / "lists" / "test.jsonl"), "--out", str(tmp_path / "feats"), "--dtype", "float16"]
    assert main(args) == 0
    assert "extracted 2 utterances" in capsys.readouterr().out
    hidden, frames, _ = load_features(tmp_path / "feats" / "odd%20id.safetensors")
    assert hidden.dtype == torch.float16 and hidden.shape == (3, frames, 32)
    assert main(args) == 0 and "extracted 0 utterances" in capsys.readouterr().out
    ups = json.loads((tmp_path / "feats" / "upstream.json").read_text())
    assert ups["checkpoint_format"] == "s3prl" and ups["checkpoint_sha256"] == build_upstream(
        "apc", ckpt=str(tmp_path / "apc.ckpt")).checkpoint_sha256
    assert main(["extract", "--upstream", "fbank", "--data", str(tmp_path / "nowhere"), "--out", "x"]) == 2
    assert "nowhere: not found" in capsys.readouterr().err
