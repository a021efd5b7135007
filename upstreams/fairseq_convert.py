"""fairseq-layout checkpoints (wav2vec 2.0, HuBERT, data2vec-audio, and unilm's WavLM) -> ``transformers`` models,
in-process and without importing fairseq or unilm.

A fairseq checkpoint is ``{"cfg": {"model": {...}, "task": {...}}, "model": state_dict, ...}`` (hydra era) or
``{"args": argparse.Namespace, "model": state_dict, ...}`` (before it). Fine-tuned ``wav2vec_ctc``/``hubert_ctc``
files keep the pre-trained model under ``w2v_encoder.w2v_model.`` with its config in ``cfg.model.w2v_args``.
s3prl's converted files hold the same three parts as ``{"model_cfg", "task_cfg", "model_weight"}``. WavLM's
original release (Microsoft's unilm code, built on fairseq's modules) is ``{"cfg": {...}, "model": state_dict}``
with one flat ``cfg`` of model settings (``normalize`` included) and no model name; it is told apart by the weights
of its gated relative position bias.

The model config maps onto ``Wav2Vec2Config`` / ``HubertConfig`` / ``WavLMConfig`` / ``Data2VecAudioConfig``
(:func:`hf_config_from_fairseq`) and the weights by the key table ``KEY_MAP`` (fairseq regex -> HF template).
fairseq modules and their HF counterparts:

fairseq module                                     HF module
------------------------------------------------  ------------------------------------------------------------
feature_extractor.conv_layers.{i}.0               feature_extractor.conv_layers.{i}.conv (Conv1d)
feature_extractor.conv_layers.0.2                 feature_extractor.conv_layers.0.layer_norm (GroupNorm, "default")
feature_extractor.conv_layers.{i}.2.1             feature_extractor.conv_layers.{i}.layer_norm (LayerNorm, "layer_norm")
layer_norm                                        feature_projection.layer_norm
post_extract_proj                                 feature_projection.projection
encoder.pos_conv.0 (weight norm: weight_g, _v)    encoder.pos_conv_embed.conv (parametrizations original0, original1)
encoder.pos_conv.{i}.0 (data2vec: depth > 1)      encoder.pos_conv_embed.layers.{i}.conv (no weight norm)
encoder.layer_norm                                encoder.layer_norm
encoder.layers.{i}.self_attn.{q,k,v,out}_proj     encoder.layers.{i}.attention.{q,k,v,out}_proj
encoder.layers.{i}.self_attn.grep_linear (WavLM)  encoder.layers.{i}.attention.gru_rel_pos_linear (the bias gate)
encoder.layers.{i}.self_attn.grep_a (WavLM)       encoder.layers.{i}.attention.gru_rel_pos_const
encoder.layers.0.self_attn.relative_attention_bias  encoder.layers.0.attention.rel_attn_embed (WavLM, layer 0)
encoder.layers.{i}.self_attn_layer_norm           encoder.layers.{i}.layer_norm
encoder.layers.{i}.fc1 / fc2                      encoder.layers.{i}.feed_forward.intermediate_dense / output_dense
encoder.layers.{i}.final_layer_norm               encoder.layers.{i}.final_layer_norm

Pre-training heads (``quantizer``, ``project_q``, ``final_proj``, ``label_embs_concat``, ``mask_emb``, data2vec's
EMA teacher ``_ema``, ...) are not part of the upstream and are dropped; any other unmapped key means an
architecture we do not convert (conformer layers, deep positional convs outside data2vec) and is an error.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from speechbench.upstreams.checkpoints import CheckpointError, to_plain

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# fairseq defaults (fairseq.models.wav2vec.Wav2Vec2Config / hubert.HubertConfig) for keys a config may omit
FAIRSEQ_DEFAULTS = {
    "extractor_mode": "default", "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12, "activation_fn": "gelu", "layer_norm_first": False,
    "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]", "conv_bias": False,
    "conv_pos": 128, "conv_pos_groups": 16, "layer_type": "transformer", "pos_conv_depth": 1,
    # unilm's WavLMConfig
    "relative_position_embedding": False, "num_buckets": 320, "max_distance": 1280, "gru_rel_pos": False,
}
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_accurate": "gelu_new", "gelu_fast": "gelu_new",
               "tanh": "tanh", "linear": "linear", "swish": "swish"}

_I = r"(\d+)"
KEY_MAP: list[tuple[str, str]] = [
    (rf"feature_extractor\.conv_layers\.{_I}\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (rf"feature_extractor\.conv_layers\.{_I}\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    (r"layer_norm\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"feature_projection.projection.\1"),
    (r"encoder\.pos_conv\.0\.bias", r"encoder.pos_conv_embed.conv.bias"),
    (r"encoder\.pos_conv\.0\.(?:weight_g|parametrizations\.weight\.original0)", r"encoder.pos_conv_embed.conv.<g>"),
    (r"encoder\.pos_conv\.0\.(?:weight_v|parametrizations\.weight\.original1)", r"encoder.pos_conv_embed.conv.<v>"),
    (rf"encoder\.pos_conv\.{_I}\.0\.(weight|bias)", r"encoder.pos_conv_embed.layers.\1.conv.\2"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (rf"encoder\.layers\.{_I}\.self_attn\.(q|k|v|out)_proj\.(weight|bias)", r"encoder.layers.\1.attention.\2_proj.\3"),
    (rf"encoder\.layers\.{_I}\.self_attn\.grep_linear\.(weight|bias)",
     r"encoder.layers.\1.attention.gru_rel_pos_linear.\2"),
    (rf"encoder\.layers\.{_I}\.self_attn\.grep_a", r"encoder.layers.\1.attention.gru_rel_pos_const"),
    (rf"encoder\.layers\.{_I}\.self_attn\.relative_attention_bias\.weight",
     r"encoder.layers.\1.attention.rel_attn_embed.weight"),
    (rf"encoder\.layers\.{_I}\.self_attn_layer_norm\.(weight|bias)", r"encoder.layers.\1.layer_norm.\2"),
    (rf"encoder\.layers\.{_I}\.fc1\.(weight|bias)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (rf"encoder\.layers\.{_I}\.fc2\.(weight|bias)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (rf"encoder\.layers\.{_I}\.final_layer_norm\.(weight|bias)", r"encoder.layers.\1.final_layer_norm.\2"),
]
_COMPILED = [(re.compile(p + r"\Z"), t) for p, t in KEY_MAP]
DROPPED_PREFIXES = ("quantizer.", "project_q.", "final_proj.", "label_embs_concat", "mask_emb", "target_glu.",
                    "project_inp.", "w2v_encoder.proj.", "decoder.", "_ema", "ema.")
WAVLM_MARKERS = (".self_attn.grep_linear.", ".self_attn.relative_attention_bias.")  # keys only WavLM has
# the weight-norm parts of the positional conv in the two HF spellings (parametrizations: torch >= 2.1)
_POS_CONV_NAMES = {"<g>": ("parametrizations.weight.original0", "weight_g"),
                   "<v>": ("parametrizations.weight.original1", "weight_v")}
FINETUNED_PREFIX = "w2v_encoder.w2v_model."


def map_key(key: str) -> str | None:
    """The HF name of a fairseq key (positional-conv weight parts as ``<g>``/``<v>`` placeholders), or None."""
    for pattern, template in _COMPILED:
        m = pattern.match(key)
        if m:
            return m.expand(template)
    return None


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Evaluate fairseq's ``conv_feature_layers`` string (lists of ``(dim, kernel, stride)`` joined with + and *)
    without ``eval``: only literals, ``+`` and ``*`` are accepted."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List | ast.Tuple):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported expression {ast.dump(node)[:60]}")

    try:
        layers = ev(ast.parse(str(spec), mode="eval"))
        layers = [tuple(int(x) for x in layer) for layer in layers]
        if not layers or any(len(layer) != 3 for layer in layers):
            raise ValueError("expected a list of (dim, kernel, stride)")
    except (SyntaxError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot parse conv_feature_layers {spec!r}: {e}") from None
    return layers


def _model_name(cfg: Mapping) -> str | None:
    name = cfg.get("_name") or cfg.get("arch")
    return str(name) if name else None


def _family_from_name(name: str | None) -> str | None:
    if not name:
        return None
    for prefix, family in (("hubert", "hubert"), ("wav2vec2", "wav2vec2"), ("data2vec_audio", "data2vec_audio"),
                           ("wavlm", "wavlm")):
        if name.startswith(prefix):
            return family
    return None


def is_flat_unilm_cfg(cfg: Any) -> bool:
    """unilm's WavLM ``cfg``: one flat dict of model settings (no ``model``/``task`` sections)."""
    return isinstance(cfg, Mapping) and not cfg.get("model") and "encoder_layers" in cfg


def fairseq_parts(payload: Mapping) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """``(model_cfg, task_cfg, state_dict)`` of a fairseq or s3prl-converted checkpoint, pre-trained part only."""
    if "model_weight" in payload:  # s3prl converted
        return to_plain(payload["model_cfg"]) or {}, to_plain(payload.get("task_cfg")) or {}, payload["model_weight"]
    cfg = to_plain(payload.get("cfg")) or {}
    if isinstance(cfg, Mapping) and cfg.get("model"):
        model_cfg, task_cfg = dict(cfg["model"]), dict(cfg.get("task") or {})
    elif is_flat_unilm_cfg(cfg):  # unilm's WavLM: model settings and ``normalize`` in one dict
        model_cfg, task_cfg = dict(cfg), dict(cfg)
    else:
        args = to_plain(payload.get("args")) or {}
        model_cfg, task_cfg = dict(args), dict(args)
    state = payload["model"]
    if any(k.startswith(FINETUNED_PREFIX) for k in state):
        w2v_args = to_plain(model_cfg.get("w2v_args"))
        if not w2v_args:
            raise CheckpointError("fine-tuned fairseq checkpoint without its pre-training config (w2v_args); "
                                  "convert the pre-trained checkpoint instead")
        if "model" in w2v_args:
            task_cfg = dict(w2v_args.get("task") or task_cfg)
            model_cfg = dict(w2v_args["model"])
        else:
            model_cfg = dict(w2v_args)
        state = {k[len(FINETUNED_PREFIX):]: v for k, v in state.items() if k.startswith(FINETUNED_PREFIX)}
    return model_cfg, task_cfg, state


def fairseq_family(payload: Mapping) -> str | None:
    """``"wav2vec2"``, ``"hubert"``, ``"data2vec_audio"`` or ``"wavlm"`` from the config's model name, else from
    the weights (WavLM's relative position bias, the pre-training heads), else None."""
    try:
        model_cfg, _, state = fairseq_parts(payload)
    except (CheckpointError, KeyError, TypeError, AttributeError):
        return None
    family = _family_from_name(_model_name(model_cfg))
    if family is None and isinstance(state, Mapping):
        if any(marker in k for k in state for marker in WAVLM_MARKERS):
            family = "wavlm"
        elif any(k.startswith("label_embs_concat") for k in state):
            family = "hubert"
        elif any(k.startswith("quantizer.") for k in state):
            family = "wav2vec2"
    return family


def hf_config_from_fairseq(family: str, model_cfg: Mapping) -> PretrainedConfig:
    """The transformers config (``Wav2Vec2Config``, ``HubertConfig``, ``WavLMConfig``, ``Data2VecAudioConfig``)
    equivalent to a fairseq/unilm model config (inference settings)."""
    from transformers import Data2VecAudioConfig, HubertConfig, Wav2Vec2Config, WavLMConfig

    c = {**FAIRSEQ_DEFAULTS, **{k: v for k, v in model_cfg.items() if v is not None}}
    depth = int(c["pos_conv_depth"])
    if c["layer_type"] != "transformer" or (depth > 1) != (family == "data2vec_audio"):
        raise CheckpointError(f"fairseq {family} with layer_type={c['layer_type']!r}, pos_conv_depth={depth} is not "
                              f"supported (only the published transformer layout)")
    if c["activation_fn"] not in ACTIVATIONS:
        raise CheckpointError(f"fairseq activation_fn {c['activation_fn']!r} is not supported")
    layers = parse_conv_layers(c["conv_feature_layers"])
    common = dict(
        hidden_size=int(c["encoder_embed_dim"]), num_hidden_layers=int(c["encoder_layers"]),
        num_attention_heads=int(c["encoder_attention_heads"]), intermediate_size=int(c["encoder_ffn_embed_dim"]),
        hidden_act=ACTIVATIONS[c["activation_fn"]], feat_extract_activation="gelu",
        conv_dim=[d for d, _, _ in layers], conv_kernel=[k for _, k, _ in layers],
        conv_stride=[s for _, _, s in layers], conv_bias=bool(c["conv_bias"]),
        feat_extract_norm="layer" if c["extractor_mode"] == "layer_norm" else "group",
        do_stable_layer_norm=bool(c["layer_norm_first"]), num_conv_pos_embeddings=int(c["conv_pos"]),
        num_conv_pos_embedding_groups=int(c["conv_pos_groups"]), layer_norm_eps=1e-5, layerdrop=0.0,
        mask_time_prob=0.0, mask_feature_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0,
    )
    if family == "hubert":
        return HubertConfig(feat_proj_layer_norm=True, **common)
    if family == "wavlm":
        if not (c["relative_position_embedding"] and c["gru_rel_pos"]):
            raise CheckpointError("WavLM without the gated relative position bias (relative_position_embedding, "
                                  "gru_rel_pos) is not supported: transformers' WavLMModel always has it")
        return WavLMConfig(num_buckets=int(c["num_buckets"]), max_bucket_distance=int(c["max_distance"]), **common)
    if family == "data2vec_audio":
        if c["extractor_mode"] != "layer_norm" or c["layer_norm_first"]:
            raise CheckpointError(f"data2vec-audio with extractor_mode={c['extractor_mode']!r}, layer_norm_first="
                                  f"{c['layer_norm_first']} is not supported (transformers' Data2VecAudioModel has a "
                                  f"layer-norm feature extractor and a post-LN encoder)")
        for key in ("feat_extract_norm", "do_stable_layer_norm", "num_conv_pos_embeddings"):
            del common[key]
        # fairseq: `depth` conv layers of kernel max(3, conv_pos // depth), each conv -> LayerNorm -> GELU
        return Data2VecAudioConfig(conv_pos_kernel_size=max(3, int(c["conv_pos"]) // depth),
                                   num_conv_pos_embeddings=depth, **common)
    return Wav2Vec2Config(**common)


def convert_state_dict(state: Mapping[str, torch.Tensor], hf_keys: set[str], source: str = "checkpoint",
                       ) -> dict[str, torch.Tensor]:
    """Rename a fairseq state dict to HF names (``hf_keys`` = the target model's keys); refuse anything unmapped."""
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state.items():
        if key.startswith(DROPPED_PREFIXES):
            continue
        name = map_key(key)
        if name is None:
            unexpected.append(key)
            continue
        for placeholder, spellings in _POS_CONV_NAMES.items():
            if name.endswith(placeholder):
                base = name[: -len(placeholder)]
                name = next((base + s for s in spellings if base + s in hf_keys), base + spellings[0])
        out[name] = value
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} fairseq key(s) with no HF counterpart, e.g. "
                              f"{', '.join(unexpected[:4])}: an architecture this converter does not support")
    missing = sorted(k for k in hf_keys if k not in out and k != "masked_spec_embed")
    if missing:
        raise CheckpointError(f"{source}: the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. "
                              f"{', '.join(missing[:4])}")
    return out


def fairseq_to_hf_model(payload: Mapping, family: str, source: str = "checkpoint") -> tuple[nn.Module, bool]:
    """Build the HF model of a fairseq / s3prl-converted / unilm checkpoint; returns ``(model, normalize)``.

    ``normalize`` is the fairseq task's (unilm: the cfg's) ``normalize`` flag (zero-mean unit-variance waveforms).
    """
    from speechbench.upstreams.hf import model_class

    model_cfg, task_cfg, state = fairseq_parts(payload)
    try:
        config = hf_config_from_fairseq(family, model_cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    model = model_class(family)(config)
    hf_keys = set(model.state_dict())
    converted = convert_state_dict(state, hf_keys, source)
    try:
        result = model.load_state_dict(converted, strict=False)  # missing keys checked by convert_state_dict
    except RuntimeError as e:  # shape mismatches: config and weights disagree
        raise CheckpointError(f"{source}: weights do not fit the model its config describes "
                              f"({str(e).splitlines()[-1].strip()})") from None
    if result.unexpected_keys:
        raise CheckpointError(f"{source}: weights the model its config describes has no place for, e.g. "
                              f"{', '.join(result.unexpected_keys[:4])}")
    return model, bool(task_cfg.get("normalize", False))
