"""WavLM and data2vec-audio through transformers: parity in padded batches, original checkpoints, HF directories,
cards with --ckpt, bench check-upstream and bench extract against transformers' own forward."""

import json

import pytest
import torch
from helpers import padded_batch, speechlike, tiny_hf_model, write_fairseq_checkpoint, write_wav

from speechbench.benchmark.check_upstream import check_upstream
from speechbench.benchmark.cli import main
from speechbench.benchmark.extract import load_features
from speechbench.upstreams.checkpoints import CheckpointError, detect_checkpoint
from speechbench.upstreams.fairseq_convert import map_key
from speechbench.upstreams.hf import HFUpstream
from speechbench.upstreams.registry import build_upstream

# (family, large): WavLM Base (group norm, post-LN), WavLM Large-style (layer norm, pre-LN, attention mask),
# data2vec-audio (layer norm, post-LN, stacked positional convs)
CASES = [("wavlm", False), ("wavlm", True), ("data2vec_audio", False)]
LENGTHS = [9000, 5123, 2400]


def _states(model, wavs, attention_mask=None) -> list[torch.Tensor]:
    """transformers' hidden states in the SUPERB convention: every layer's input, then the encoder output."""
    with torch.inference_mode():
        out = model(wavs, attention_mask=attention_mask, output_hidden_states=True)
    return list(out.hidden_states[:-1]) + [out.last_hidden_state]


@pytest.mark.parametrize("family,large", CASES)
def test_outputs_equal_transformers_in_padded_batches(family, large):
    model = tiny_hf_model(family, large, seed=1)
    up = HFUpstream(model, "t", family, normalize=False)
    assert (up.num_layers, up.hidden_size, up.downsample_rate) == (3, 32, 320)
    assert up.use_attention_mask is (large or family == "data2vec_audio") and up.pre_layer_norm is large
    wavs, lengths = padded_batch(LENGTHS)
    with torch.inference_mode():
        ours = up(wavs, lengths)
    frames = model._get_feat_extract_output_lengths(lengths)
    assert torch.equal(ours.lengths, frames)
    mask = (torch.arange(wavs.shape[1])[None, :] < lengths[:, None]).long()
    batch_ref = _states(model, wavs, mask) if up.use_attention_mask else None
    for b, n in enumerate(LENGTHS):
        k = int(frames[b])
        alone = _states(model, wavs[b: b + 1, :n])  # transformers on the utterance alone, unpadded
        assert len(alone) == up.num_layers
        for layer in range(up.num_layers):
            torch.testing.assert_close(ours.hidden[b, layer, :k], alone[layer][0], atol=2e-5, rtol=1e-4)
            if family == "wavlm" and large:  # transformers' own padded batch with its attention mask: exact too
                torch.testing.assert_close(ours.hidden[b, layer, :k], batch_ref[layer][b, :k], atol=2e-5, rtol=1e-4)
        assert k == ours.hidden.shape[2] or ours.hidden[b, :, k:].abs().max() == 0
    if family == "data2vec_audio":  # transformers' padded batch is not exact: later positional convs read padding
        shortest = int(frames[2])
        assert (batch_ref[-1][2, :shortest] - ours.hidden[2, -1, :shortest]).abs().max() > 1e-3


def test_wavlm_relative_position_bias_is_in_every_layer_and_padding_independent():
    """Layer 0 computes the bias, every layer gates it with its own input; a frame's outputs never depend on how
    far the batch is padded (relative positions only)."""
    model = tiny_hf_model("wavlm", seed=2)
    assert [hasattr(layer.attention, "rel_attn_embed") for layer in model.encoder.layers] == [True, False]
    assert all(layer.attention.gru_rel_pos_linear.weight.shape == (8, 16) for layer in model.encoder.layers)
    with torch.no_grad():  # a bias large enough to dominate the attention logits
        model.encoder.layers[0].attention.rel_attn_embed.weight.normal_(0.0, 3.0)
    up = HFUpstream(model, "t", "wavlm", normalize=False)
    wav = speechlike(6400, 3)
    with torch.inference_mode():
        alone = up(wav[None], torch.tensor([6400])).hidden[0]
        for pad in (320, 3200, 16000):
            padded = torch.nn.functional.pad(wav, (0, pad))[None]
            torch.testing.assert_close(up(padded, torch.tensor([6400])).hidden[0], alone, atol=1e-5, rtol=1e-4)
        with torch.no_grad():  # layer 1's gate at its extreme (2x the bias): only layer 1's output changes
            model.encoder.layers[1].attention.gru_rel_pos_linear.bias.fill_(-30.0)
        gated = up(wav[None], torch.tensor([6400])).hidden[0]
        with torch.no_grad():  # no bias at all: layer 0's output changes too
            model.encoder.layers[0].attention.rel_attn_embed.weight.zero_()
        unbiased = up(wav[None], torch.tensor([6400])).hidden[0]
    torch.testing.assert_close(gated[:2], alone[:2])
    assert (gated[2] - alone[2]).abs().max() > 1e-3  # ~1e-2 here; numerical noise is ~1e-6
    torch.testing.assert_close(unbiased[0], alone[0])
    assert (unbiased[1] - alone[1]).abs().max() > 1e-3


def test_data2vec_positional_conv_hooks_equal_the_equal_length_fallback():
    up = HFUpstream(tiny_hf_model("data2vec_audio", seed=7), "t", "data2vec_audio", normalize=False)
    assert len(up._pos_conv_layers) == 3 and up._pos_conv_known
    wavs, lengths = padded_batch([6400, 6400, 4100, 1700])
    with torch.inference_mode():
        hooked = up(wavs, lengths)  # one padded batch, padding zeroed before every positional conv layer
        up._pos_conv_layers, up._pos_conv_known = [], False  # an unknown layout: sub-batches of equal lengths
        grouped = up(wavs, lengths)
    torch.testing.assert_close(hooked.hidden, grouped.hidden, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family,large", CASES)
def test_batched_equals_one_at_a_time(family, large):
    up = HFUpstream(tiny_hf_model(family, large, seed=3), "t", family, normalize=True)
    wavs, lengths = padded_batch([7000, 7000, 3300, 200])  # equal lengths, and one shorter than the receptive field
    with torch.inference_mode():
        batched = up(wavs, lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = up(wavs[b: b + 1, :n], lengths[b: b + 1])
            k = int(batched.lengths[b])
            torch.testing.assert_close(batched.hidden[b, :, :k], alone.hidden[0], atol=1e-5, rtol=1e-4)
    assert batched.lengths.tolist()[-1] == 1


def test_unsupported_original_layouts_fail_in_one_line(tmp_path):
    model = tiny_hf_model("wavlm", seed=5)
    payload = torch.load(write_fairseq_checkpoint(tmp_path / "w.pt", model, "wavlm", False, "unilm"))
    payload["cfg"]["gru_rel_pos"] = False
    torch.save(payload, tmp_path / "nogate.pt")
    with pytest.raises(CheckpointError) as err:
        build_upstream(str(tmp_path / "nogate.pt"))
    assert str(err.value).startswith(f"{tmp_path / 'nogate.pt'}: WavLM without the gated relative position bias")
    assert "\n" not in str(err.value)
    d2v = tiny_hf_model("data2vec_audio", seed=5)
    payload = torch.load(write_fairseq_checkpoint(tmp_path / "d.pt", d2v, "data2vec_audio", True, "cfg"),
                         weights_only=False)
    payload["cfg"]["model"]["layer_norm_first"] = True
    torch.save(payload, tmp_path / "preln.pt")
    with pytest.raises(CheckpointError, match="layer_norm_first=True is not supported"):
        build_upstream(str(tmp_path / "preln.pt"))


def test_key_map_covers_the_new_modules():
    assert map_key("encoder.layers.3.self_attn.grep_linear.bias") == \
        "encoder.layers.3.attention.gru_rel_pos_linear.bias"
    assert map_key("encoder.layers.0.self_attn.grep_a") == "encoder.layers.0.attention.gru_rel_pos_const"
    assert map_key("encoder.layers.0.self_attn.relative_attention_bias.weight") == \
        "encoder.layers.0.attention.rel_attn_embed.weight"
    assert map_key("encoder.pos_conv.4.0.weight") == "encoder.pos_conv_embed.layers.4.conv.weight"
    assert map_key("encoder.pos_conv.0.bias") == "encoder.pos_conv_embed.conv.bias"  # wav2vec 2.0's single conv


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Local HF directories (config.json + model.safetensors + preprocessor_config.json) of each new family."""
    from transformers import Wav2Vec2FeatureExtractor

    base = tmp_path_factory.mktemp("hf")
    dirs = {}
    for family, large in CASES:
        path = base / f"{family}{'_large' if large else ''}"
        tiny_hf_model(family, large, seed=6).save_pretrained(path)
        Wav2Vec2FeatureExtractor(do_normalize=large).save_pretrained(path)
        dirs[(family, large)] = path
    return dirs


@pytest.mark.parametrize("family,large", CASES)
def test_hf_directories_are_detected_and_pass_the_contract_check(hf_dirs, family, large):
    detected = detect_checkpoint(hf_dirs[(family, large)])
    assert (detected.format, detected.family) == ("hf-dir", family)
    up = build_upstream(str(hf_dirs[(family, large)]))
    assert up.family == family and up.normalize is large
    results = check_upstream(up, long_seconds=3.0)
    assert all(r.ok for r in results), [r.line() for r in results if not r.ok]


def test_cli_check_upstream_and_cards_with_ckpt(hf_dirs, capsys):
    assert main(["check-upstream", str(hf_dirs[("data2vec_audio", False)]), "--seconds", "2"]) == 0
    assert "PASS: 7/7 checks passed" in capsys.readouterr().out
    for card, key in (("wavlm_base", ("wavlm", False)), ("wavlm_large", ("wavlm", True)),
                      ("data2vec_base", ("data2vec_audio", False))):
        up = build_upstream(card, ckpt=str(hf_dirs[key]))
        assert up.name == card and up.family == key[0]
    with pytest.raises(CheckpointError, match="holds a wavlm model, but --upstream data2vec_large is a "
                                              "data2vec_audio upstream"):
        build_upstream("data2vec_large", ckpt=str(hf_dirs[("wavlm", False)]))


@pytest.mark.parametrize("family,large", CASES)
def test_bench_extract_equals_transformers_layer_by_layer(tmp_path, hf_dirs, family, large):
    """The held-out check: bench extract on a local HF directory, every layer of every utterance, against
    transformers' forward of that utterance (normalised as the directory's preprocessor_config.json says)."""
    import soundfile as sf
    import transformers

    seconds = {"a": 1.37, "b": 0.61, "c": 2.05, "d": 0.02}  # "d" is shorter than the 400-sample receptive field
    for i, (uid, s) in enumerate(seconds.items()):
        write_wav(tmp_path / "audio" / f"{uid}.wav", s, seed=10 + i)
    path = hf_dirs[(family, large)]
    assert main(["extract", "--upstream", str(path), "--data", str(tmp_path / "audio"), "--out",
                 str(tmp_path / "feats")]) == 0
    meta = json.loads((tmp_path / "feats" / "upstream.json").read_text())
    assert (meta["family"], meta["num_layers"], meta["checkpoint_format"]) == (family, 3, "hf-dir")
    name = {"wavlm": "WavLMModel", "data2vec_audio": "Data2VecAudioModel"}[family]
    model = getattr(transformers, name).from_pretrained(path).eval()
    extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(path)
    for uid in seconds:
        wav, _ = sf.read(tmp_path / "audio" / f"{uid}.wav", dtype="float32")
        inputs = extractor(wav, sampling_rate=16000, return_tensors="pt")["input_values"]
        inputs = torch.nn.functional.pad(inputs, (0, max(0, 400 - inputs.shape[1])))
        expected = _states(model, inputs)
        hidden, frames, _ = load_features(tmp_path / "feats" / f"{uid}.safetensors")
        assert hidden.shape == (3, expected[0].shape[1], 32) and frames == hidden.shape[1]
        for layer in range(3):
            torch.testing.assert_close(hidden[layer], expected[layer][0], atol=2e-5, rtol=1e-4)


def test_list_families_shows_the_new_families(capsys):
    assert main(["list", "families", "--json"]) == 0
    listed = {f["name"]: f for f in json.loads(capsys.readouterr().out)}
    assert {name: listed[name]["hf_model_type"] for name in ("wavlm", "data2vec_audio", "distilhubert")} == \
        {"wavlm": "wavlm", "data2vec_audio": "data2vec-audio", "distilhubert": None}
    assert not any(listed[name]["pretrain"] for name in ("wavlm", "data2vec_audio", "distilhubert"))
    assert main(["list", "families"]) == 0
    out = capsys.readouterr().out
    assert "data2vec_audio data2vec (audio): " in out and "HF model_type data2vec-audio" in out
