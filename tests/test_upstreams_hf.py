"""wav2vec 2.0 / HuBERT through transformers: SUPERB conventions, checkpoint formats, batch invariance."""

import json

import pytest
import torch
from helpers import (
    install_fake_fairseq_dictionary,
    padded_batch,
    speechlike,
    tiny_hf_model,
    write_fairseq_checkpoint,
)

from speechbench.common import sha256_file
from speechbench.upstreams.hf import FAIRSEQ_NORM_EPS, HF_NORM_EPS, HFUpstream, save_hf_checkpoint
from speechbench.upstreams.registry import build_upstream

CASES = [("wav2vec2", False), ("hubert", False), ("wav2vec2", True), ("hubert", True)]
LENGTHS = [9000, 5123, 2400]


def _hf_forward(model, wavs, attention_mask=None):
    with torch.inference_mode():
        return model(wavs, attention_mask=attention_mask, output_hidden_states=True)


@pytest.mark.parametrize("family,large", CASES)
def test_outputs_equal_a_direct_transformers_forward(family, large):
    from transformers import Wav2Vec2FeatureExtractor

    model = tiny_hf_model(family, large)
    up = HFUpstream(model, "t", family, normalize=large)
    assert (up.num_layers, up.hidden_size, up.downsample_rate) == (3, 32, 320)
    assert up.use_attention_mask is large and up.pre_layer_norm is large
    wavs, lengths = padded_batch(LENGTHS)
    with torch.inference_mode():
        ours = up(wavs, lengths)
    extractor = Wav2Vec2FeatureExtractor(do_normalize=large, return_attention_mask=True)
    if large:  # one padded batch with the attention mask, normalised by HF's own feature extractor
        inputs = extractor([w[:n].numpy() for w, n in zip(wavs, LENGTHS, strict=True)], sampling_rate=16000,
                           padding=True, return_tensors="pt")
        ref = _hf_forward(model, inputs["input_values"], inputs["attention_mask"])
        refs = [(ref, b) for b in range(len(LENGTHS))]
    else:  # base models take no attention mask: compare with each utterance alone
        refs = [(_hf_forward(model, wavs[b: b + 1, :n]), 0) for b, n in enumerate(LENGTHS)]
    expected_frames = model._get_feat_extract_output_lengths(lengths)
    assert torch.equal(ours.lengths, expected_frames)
    for b, (ref, j) in enumerate(refs):
        n = int(expected_frames[b])
        states = list(ref.hidden_states[:-1]) + [ref.last_hidden_state]
        for layer, state in enumerate(states):
            torch.testing.assert_close(ours.hidden[b, layer, :n], state[j, :n], atol=2e-5, rtol=1e-4)
        assert ours.hidden[b, :, n:].abs().max() == 0 if n < ours.hidden.shape[2] else True


def test_pre_ln_last_state_is_the_normalised_encoder_output():
    model = tiny_hf_model("wav2vec2", large=True)
    up = HFUpstream(model, "t", "wav2vec2", normalize=False)
    wav = speechlike(6000, 3)[None]
    with torch.inference_mode():
        ours = up(wav, torch.tensor([6000])).hidden[0]
        ref = _hf_forward(model, wav)
        normed = model.encoder.layer_norm(ref.hidden_states[-1])
    assert len(ref.hidden_states) == up.num_layers
    torch.testing.assert_close(ours[-1], normed[0])  # encoder output after the final LayerNorm
    torch.testing.assert_close(ours[0], ref.hidden_states[0][0])  # input of layer 1: x + pos_conv(x), no norm


@pytest.mark.parametrize("family,large", CASES)
def test_batched_equals_one_at_a_time(family, large):
    up = HFUpstream(tiny_hf_model(family, large), "t", family, normalize=True)
    wavs, lengths = padded_batch([7000, 7000, 3300, 200])  # two equal lengths, one shorter than the receptive field
    with torch.inference_mode():
        batched = up(wavs, lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = up(wavs[b: b + 1, :n], lengths[b: b + 1])
            k = int(batched.lengths[b])
            assert int(alone.lengths[0]) == k
            torch.testing.assert_close(batched.hidden[b, :, :k], alone.hidden[0], atol=1e-5, rtol=1e-4)
    assert batched.lengths.tolist()[-1] == 1


def test_group_norm_models_are_exact_with_or_without_the_masked_norm_hook():
    up = HFUpstream(tiny_hf_model("wav2vec2", large=False, seed=5), "t", "wav2vec2", normalize=False)
    assert up._masked_norm is not None  # padded batches: GroupNorm statistics over valid frames + frame mask
    wavs, lengths = padded_batch([6400, 6400, 4100])
    with torch.inference_mode():
        hooked = up(wavs, lengths)
        up._masked_norm = None  # fallback: sub-batches of equal lengths, never padded
        grouped = up(wavs, lengths)
        plain = _hf_forward(up.model, wavs[2:, :4100])  # transformers on the lone unpadded utterance
    torch.testing.assert_close(hooked.hidden, grouped.hidden, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hooked.hidden[2, 0, :12], plain.hidden_states[0][0], atol=1e-5, rtol=1e-4)


def test_normalisation_matches_hf_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    from speechbench.upstreams.hf import normalize_waveforms

    wavs, lengths = padded_batch([4000, 2500])
    ours = normalize_waveforms(wavs * 3 + 0.2, lengths, HF_NORM_EPS)
    extractor = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    ref = extractor([(w * 3 + 0.2)[:n].numpy() for w, n in zip(wavs, [4000, 2500], strict=True)],
                    sampling_rate=16000, padding=True, return_tensors="pt")
    torch.testing.assert_close(ours, ref["input_values"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_local_hf_directory_and_our_format(tmp_path, normalize):
    from transformers import Wav2Vec2FeatureExtractor

    model = tiny_hf_model("hubert", large=False, seed=1)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    Wav2Vec2FeatureExtractor(do_normalize=normalize).save_pretrained(hf_dir)
    up = build_upstream(str(hf_dir))
    assert up.checkpoint_format == "hf-dir" and up.normalize is normalize
    assert up.checkpoint_sha256 == sha256_file(hf_dir / "model.safetensors")
    ours_dir = save_hf_checkpoint(model, tmp_path / "ours", normalize=normalize)
    ours = build_upstream(str(ours_dir))
    assert ours.checkpoint_format == "speechbench" and ours.normalize is normalize
    assert json.loads((ours_dir / "speechbench.json").read_text())["family"] == "hubert"
    ref = HFUpstream(model, "ref", "hubert", normalize=normalize)
    wavs, lengths = padded_batch([5000, 3000])
    with torch.inference_mode():
        for other in (up, ours):
            torch.testing.assert_close(other(wavs, lengths).hidden, ref(wavs, lengths).hidden)
    # a directory without preprocessor_config.json does not ask for normalisation
    (hf_dir / "preprocessor_config.json").unlink()
    assert build_upstream(str(hf_dir)).normalize is False


ORIGINAL_CHECKPOINTS = [(family, large, style) for family, large in (("wav2vec2", False), ("hubert", True))
                        for style in ("cfg", "args", "s3prl", "finetuned")] + [
    ("wavlm", False, "unilm"), ("wavlm", True, "unilm"),  # WavLM as unilm released it (Base and Large layouts)
    ("data2vec_audio", False, "cfg"), ("data2vec_audio", True, "s3prl"), ("data2vec_audio", False, "finetuned")]


@pytest.mark.parametrize("family,large,style", ORIGINAL_CHECKPOINTS)
def test_fairseq_and_s3prl_checkpoints_convert_to_the_same_outputs(tmp_path, monkeypatch, family, large, style):
    """``large`` also sets the checkpoint's ``normalize`` (data2vec-audio has one layout whatever it says)."""
    model = tiny_hf_model(family, large, seed=2)
    dictionary = install_fake_fairseq_dictionary(monkeypatch) if family == "hubert" and style == "cfg" else None
    path = write_fairseq_checkpoint(tmp_path / "ckpt.pt", model, family, normalize=large, style=style,
                                    dictionary_cls=dictionary)
    for name in ("fairseq.data.dictionary", "fairseq.data", "fairseq"):  # loading must not need fairseq
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    up = build_upstream(str(path))
    assert up.checkpoint_format == {"s3prl": "s3prl", "unilm": "unilm"}.get(style, "fairseq")
    assert up.family == family and up.normalize is large and up.checkpoint_sha256 == sha256_file(path)
    ref = HFUpstream(model, "ref", family, normalize=large, norm_eps=FAIRSEQ_NORM_EPS)
    wavs, lengths = padded_batch(LENGTHS)
    with torch.inference_mode():
        torch.testing.assert_close(up(wavs, lengths).hidden, ref(wavs, lengths).hidden, atol=1e-5, rtol=1e-4)


def test_family_name_with_ckpt_checks_the_family(tmp_path):
    model = tiny_hf_model("wav2vec2", seed=3)
    model.save_pretrained(tmp_path / "w2v")
    up = build_upstream("wav2vec2", ckpt=str(tmp_path / "w2v"))
    assert up.name == "wav2vec2" and up.family == "wav2vec2"
    from speechbench.upstreams.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match=r"holds a wav2vec2 model, but --upstream hubert is a hubert upstream"):
        build_upstream("hubert", ckpt=str(tmp_path / "w2v"))


def test_conv_key_map_and_safe_conv_spec_parser():
    from speechbench.upstreams.checkpoints import CheckpointError
    from speechbench.upstreams.fairseq_convert import map_key, parse_conv_layers

    assert parse_conv_layers("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2")[-1] == (512, 2, 2)
    with pytest.raises(CheckpointError, match="cannot parse"):
        parse_conv_layers("__import__('os').system('true')")
    assert map_key("encoder.layers.11.self_attn.out_proj.weight") == "encoder.layers.11.attention.out_proj.weight"
    assert map_key("layer_norm.bias") == "feature_projection.layer_norm.bias"
    assert map_key("encoder.layer_norm.bias") == "encoder.layer_norm.bias"
    assert map_key("encoder.layers.0.conv_module.depthwise_conv.weight") is None
