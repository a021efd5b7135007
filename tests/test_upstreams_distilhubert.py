"""DistilHuBERT (s3prl's distiller), native: s3prl's checkpoint layout built here by hand, a hand-computed forward,
parity of the shared modules with transformers' HuBERT, shapes, frame counts and batch invariance."""

import argparse
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_HF, hf_to_fairseq_key, jitter, padded_batch

from speechbench.benchmark.check_upstream import check_upstream
from speechbench.benchmark.cli import main as bench
from speechbench.common import sha256_file
from speechbench.upstreams.checkpoints import CheckpointError, detect_checkpoint, save_speechbench_checkpoint
from speechbench.upstreams.distilhubert import DistilHuBERT, DistilHuBERTConfig, DistilHuBERTUpstream
from speechbench.upstreams.registry import build_upstream

# a tiny distiller: 16-channel CNN (wav2vec 2.0's kernels and strides), 32-d, 2 layers of 2 heads, 3 prediction heads
CONV = [(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2
C, D, FFN, HEADS, K, GROUPS, LAYERS, TASKS = 16, 32, 64, 2, 16, 4, 2, 3
DISTILLER = {  # s3prl's Config["distiller"] as its pre-training writes it (training-only keys included)
    "extractor_mode": "default", "extractor_conv_feature_layers": "[(16,10,5)] + [(16,3,2)] * 4 + [(16,2,2)] * 2",
    "extractor_dropout": 0.0, "feature_grad_mult": 0.1, "conv_pos": K, "conv_pos_groups": GROUPS,
    "encoder_layers": LAYERS, "encoder_embed_dim": D, "encoder_ffn_embed_dim": FFN, "encoder_attention_heads": HEADS,
    "activation_fn": "gelu", "layer_norm_first": False, "attention_type": "original", "dropout": 0.1,
    "attention_dropout": 0.1, "activation_dropout": 0.1, "encoder_layerdrop": 0.0, "final_dim": D,
    "out_layer_type": "expand-last", "n_tasks": TASKS, "task_emb_type": "expand-last", "loss_type": "l1",
    "feat_pen_loss": 0.0, "cosine_loss": 1.0, "pred_layer_id": [4, 8, 12], "init_teacher_conv_layers": True,
    "init_teacher_encoder_layers": True,
}
TINY = DistilHuBERTConfig(conv_layers=tuple(CONV), conv_pos=K, conv_pos_groups=GROUPS, encoder_layers=LAYERS,
                          encoder_embed_dim=D, encoder_ffn_embed_dim=FFN, encoder_attention_heads=HEADS, n_tasks=TASKS,
                          out_layer_inter_dim=D)


def s3prl_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the names and shapes of s3prl's distiller modules (written from its module layout:
    fairseq's conv blocks ``Sequential(conv, dropout, GroupNorm, GELU)``, weight-normed ``pos_conv.0``, fairseq
    attention, ``output_layer = Sequential(Linear, GELU, SplitLinear)``), independent of our module."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None, offset=0.0):
        scale = 1 / math.sqrt(shape[-1]) if scale is None else scale
        return offset + scale * torch.randn(*shape, generator=g)

    state, dim_in = {}, 1
    for i, (d, k, _) in enumerate(CONV):
        state[f"feature_extractor.conv_layers.{i}.0.weight"] = rand(d, dim_in, k, scale=1 / math.sqrt(dim_in * k))
        dim_in = d
    state["feature_extractor.conv_layers.0.2.weight"] = rand(C, scale=0.1, offset=1.0)
    state["feature_extractor.conv_layers.0.2.bias"] = rand(C, scale=0.1)
    state["post_extract_proj.weight"], state["post_extract_proj.bias"] = rand(D, C), rand(D, scale=0.1)
    state["encoder.pos_conv.0.weight_g"] = rand(1, 1, K, scale=0.2, offset=1.0)
    state["encoder.pos_conv.0.weight_v"] = rand(D, D // GROUPS, K)
    state["encoder.pos_conv.0.bias"] = rand(D, scale=0.1)
    state["encoder.layer_norm.weight"] = rand(D, scale=0.1, offset=1.0)
    state["encoder.layer_norm.bias"] = rand(D, scale=0.1)
    for i in range(LAYERS):
        p = f"encoder.layers.{i}"
        for proj in ("k", "v", "q", "out"):
            state[f"{p}.self_attn.{proj}_proj.weight"] = rand(D, D)
            state[f"{p}.self_attn.{proj}_proj.bias"] = rand(D, scale=0.1)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            state[f"{p}.{norm}.weight"], state[f"{p}.{norm}.bias"] = rand(D, scale=0.1, offset=1.0), rand(D, scale=0.1)
        state[f"{p}.fc1.weight"], state[f"{p}.fc1.bias"] = rand(FFN, D), rand(FFN, scale=0.1)
        state[f"{p}.fc2.weight"], state[f"{p}.fc2.bias"] = rand(D, FFN), rand(D, scale=0.1)
    state["output_layer.0.weight"], state["output_layer.0.bias"] = rand(TASKS * D, D), rand(TASKS * D, scale=0.1)
    state["output_layer.2.weight"] = rand(TASKS, D, D)
    state["output_layer.2.bias"] = rand(1, 1, TASKS, D, scale=0.1)
    return state


def write_s3prl_checkpoint(path, state, distiller=None):
    """The file s3prl's distiller pre-training saves (runner.py + pretrain_expert.add_state_to_save)."""
    torch.save({"Optimizer": {"state": {}, "param_groups": [{"lr": 2e-4, "params": [0, 1]}]}, "Step": 200000,
                "Args": argparse.Namespace(mode="train", expdir="result/pretrain/distilhubert", seed=1337),
                "Config": {"distiller": distiller or DISTILLER, "teacher": {"model": "hubert_base", "n_layers": 12},
                           "task": {"sequence_length": 250000}, "audio": {"target_level": None}},
                "Distiller": state}, path)
    return path


def reference_forward(state: dict, wav: torch.Tensor) -> list[torch.Tensor]:
    """s3prl's distiller forward for one unpadded utterance ``[S]``, written out with torch.nn.functional on the
    state dict: ``[feat_final, layer 1, layer 2, head 1, head 2, head 3]``, each ``[T, D]``."""
    x = wav[None, None]
    for i, (_, _, stride) in enumerate(CONV):
        x = F.conv1d(x, state[f"feature_extractor.conv_layers.{i}.0.weight"], stride=stride)
        if i == 0:
            x = F.group_norm(x, C, state["feature_extractor.conv_layers.0.2.weight"],
                             state["feature_extractor.conv_layers.0.2.bias"])
        x = F.gelu(x)
    feat = F.linear(x[0].T, state["post_extract_proj.weight"], state["post_extract_proj.bias"])  # [T, D]
    v, g = state["encoder.pos_conv.0.weight_v"], state["encoder.pos_conv.0.weight_g"]
    weight = g * v / v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
    pos = F.conv1d(feat.T[None], weight, state["encoder.pos_conv.0.bias"], padding=K // 2, groups=GROUPS)
    h = feat + F.gelu(pos[0, :, :-1]).T  # even kernel: the last frame is dropped (SamePad)
    h = F.layer_norm(h, (D,), state["encoder.layer_norm.weight"], state["encoder.layer_norm.bias"])
    states = [feat]
    for i in range(LAYERS):
        p = f"encoder.layers.{i}."

        def lin(name, z, p=p):
            return F.linear(z, state[p + name + ".weight"], state[p + name + ".bias"])

        def ln(name, z, p=p):
            return F.layer_norm(z, (D,), state[p + name + ".weight"], state[p + name + ".bias"])

        q, k, v = (lin(f"self_attn.{n}_proj", h).view(-1, HEADS, D // HEADS).transpose(0, 1) for n in "qkv")
        attn = torch.softmax((q * (D // HEADS) ** -0.5) @ k.transpose(1, 2), dim=-1)  # [H, T, T]
        h = ln("self_attn_layer_norm", h + lin("self_attn.out_proj", (attn @ v).transpose(0, 1).reshape(-1, D)))
        h = ln("final_layer_norm", h + lin("fc2", F.gelu(lin("fc1", h))))
        states.append(h)
    y = F.gelu(F.linear(h, state["output_layer.0.weight"], state["output_layer.0.bias"]))  # [T, N * D]
    for n in range(TASKS):
        head_w, head_b = state["output_layer.2.weight"][n], state["output_layer.2.bias"][0, 0, n]
        states.append(y[:, n * D: (n + 1) * D] @ head_w + head_b)
    return states


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_s3prl_checkpoint(tmp_path_factory.mktemp("distil") / "distilhubert.ckpt", s3prl_state())


def test_s3prl_checkpoint_loads_safely_and_matches_the_hand_computed_forward(checkpoint):
    detected = detect_checkpoint(checkpoint)  # safe unpickling: Args is an argparse.Namespace, the rest plain data
    assert (detected.format, detected.family) == ("s3prl", "distilhubert")
    up = build_upstream(str(checkpoint))
    assert (up.num_layers, up.hidden_size, up.downsample_rate, up.family) == (1 + LAYERS + TASKS, D, 320,
                                                                                "distilhubert")
    assert up.checkpoint_format == "s3prl" and up.checkpoint_sha256 == sha256_file(checkpoint)
    state = s3prl_state()
    wavs, lengths = padded_batch([9000, 5123, 2400])
    with torch.inference_mode():
        out = up(wavs, lengths)
        for b, n in enumerate(lengths.tolist()):
            expected = reference_forward(state, wavs[b, :n])
            k = int(out.lengths[b])
            assert k == expected[0].shape[0]
            for layer, ref in enumerate(expected):
                torch.testing.assert_close(out.hidden[b, layer, :k], ref, atol=2e-5, rtol=1e-4)


def test_shared_modules_match_transformers_hubert():
    """The CNN, projection, positional conv and post-LN layers are HuBERT Base's (without the feature LayerNorm):
    with one set of weights, ours and transformers' HubertModel agree on the projected features and both layers."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(3)
    hf = jitter(HubertModel(HubertConfig(**TINY_HF, feat_proj_layer_norm=False)).eval(), 3)
    state = {hf_to_fairseq_key(k, False): v for k, v in hf.state_dict().items() if k != "masked_spec_embed"}
    state.update({k: v for k, v in s3prl_state().items() if k.startswith("output_layer.")})
    model = DistilHuBERT(TINY)
    model.load_state_dict(state, strict=True)
    up = DistilHuBERTUpstream(model)
    wavs, lengths = padded_batch([8000, 3000])
    with torch.inference_mode():
        ours = up(wavs, lengths)
        for b, n in enumerate(lengths.tolist()):
            ref = hf(wavs[b: b + 1, :n], output_hidden_states=True)
            projected = hf.feature_projection(hf.feature_extractor(wavs[b: b + 1, :n]).transpose(1, 2))
            projected = projected[0] if isinstance(projected, tuple) else projected
            k = int(ours.lengths[b])
            torch.testing.assert_close(ours.hidden[b, 0, :k], projected[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(ours.hidden[b, 1, :k], ref.hidden_states[1][0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(ours.hidden[b, 2, :k], ref.last_hidden_state[0], atol=2e-5, rtol=1e-4)


def test_weight_free_forward_shapes_frames_and_batch_invariance():
    torch.manual_seed(0)
    up = DistilHuBERTUpstream(DistilHuBERT(TINY))
    wavs, lengths = padded_batch([16000, 8000, 8000, 399, 3217])
    with torch.inference_mode():
        out = up(wavs, lengths)
        assert out.hidden.shape == (5, 6, 49, D) and out.lengths.tolist() == [49, 24, 24, 1, 9]
        for b, n in enumerate(lengths.tolist()):
            alone = up(wavs[b: b + 1, :n], lengths[b: b + 1])
            k = int(out.lengths[b])
            torch.testing.assert_close(out.hidden[b, :, :k], alone.hidden[0], atol=1e-5, rtol=1e-4)
            assert k == 49 or out.hidden[b, :, k:].abs().max() == 0
        with pytest.raises(ValueError, match=r"wav_lengths must be \[B\] in \[1, 16000\]"):
            up(wavs, torch.tensor([16001, 1, 1, 1, 1]))
    published = DistilHuBERTUpstream(DistilHuBERT(DistilHuBERTConfig()))  # the released architecture
    assert (published.num_layers, published.hidden_size, published.downsample_rate) == (6, 768, 320)
    assert sum(p.numel() for p in published.parameters()) == 27_034_752  # 23.49 M + the 3 prediction heads


def test_our_format_round_trip_and_contract_check(tmp_path, checkpoint, capsys):
    up = build_upstream(str(checkpoint))
    out_dir = save_speechbench_checkpoint(tmp_path / "ours", "distilhubert", dataclasses.asdict(TINY),
                                          up.model.state_dict())
    ours = build_upstream(str(out_dir))
    assert ours.checkpoint_format == "speechbench" and ours.settings == up.settings
    wavs, lengths = padded_batch([6000, 2500])
    with torch.inference_mode():
        torch.testing.assert_close(ours(wavs, lengths).hidden, up(wavs, lengths).hidden)
    results = check_upstream(up, long_seconds=30.0)
    assert all(r.ok for r in results), [r.line() for r in results if not r.ok]
    card = build_upstream("distilhubert", ckpt=str(checkpoint))  # the card with in-house weights
    assert card.name == "distilhubert" and card.family == "distilhubert"
    assert bench(["check-upstream", "distilhubert", "--ckpt", str(out_dir), "--seconds", "2"]) == 0
    assert "PASS: 7/7 checks passed" in capsys.readouterr().out


def test_bad_checkpoints_fail_in_one_line(tmp_path):
    state = s3prl_state()
    path = write_s3prl_checkpoint(tmp_path / "add.ckpt", state, {**DISTILLER, "task_emb_type": "add"})
    with pytest.raises(CheckpointError, match="task_emb_type='add'.*is not supported"):
        build_upstream(str(path))
    del state["encoder.layers.1.fc2.bias"]
    path = write_s3prl_checkpoint(tmp_path / "missing.ckpt", state)
    with pytest.raises(CheckpointError) as err:
        build_upstream(str(path))
    assert str(err.value).startswith(str(path)) and "encoder.layers.1.fc2.bias" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="final_dim 16 != encoder_embed_dim 32"):
        build_upstream(str(write_s3prl_checkpoint(tmp_path / "narrow.ckpt", s3prl_state(),
                                                  {**DISTILLER, "final_dim": 16})))
