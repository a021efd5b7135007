"""DistilHuBERT (s3prl's ``distiller``) as a native PyTorch upstream, loading s3prl's checkpoints without s3prl.

DistilHuBERT (Chang et al., 2022) distils HuBERT Base into 2 transformer layers plus prediction heads that regress
the teacher's layers 4, 8 and 12. The model (s3prl ``upstream/distiller/model.py`` and ``module.py``, built from
fairseq's wav2vec 2.0 modules):

- ``feature_extractor``: wav2vec 2.0's CNN, ``[B, S] -> [B, C, T]`` (``extractor_mode`` "default": a per-channel
  GroupNorm on the first conv only; "layer_norm": a LayerNorm in every block), no conv bias, 320 samples per frame;
- ``post_extract_proj``: Linear(C, D), absent when C == D. Unlike wav2vec 2.0/HuBERT there is no LayerNorm before
  it. Its output is s3prl's ``feat_final``, the first hidden state;
- ``encoder``: padded frames set to 0, ``x + GELU(SamePad(conv(x)))`` (a weight-normed grouped conv, weight norm
  over dim 2), ``encoder.layer_norm`` (post-LN; pre-LN encoders apply it at the end instead), then ``encoder_layers``
  fairseq transformer layers (post-LN by default: ``LN(x + attn(x))``, then ``LN(x + fc2(act(fc1(x))))``);
- ``output_layer`` (``out_layer_type`` "expand-last"): Linear(D, n_tasks * D') -> GELU -> ``SplitLinear`` (one
  Linear(D', final_dim) per task on its slice), on the encoder output: one prediction per distilled teacher layer.

s3prl's wrapper (``upstream/distiller/expert.py``, whose default ``no_pred=False`` is what SUPERB ran) exposes
``[feat_final] + every layer's output + every head's prediction``: for the published ``distilhubert`` (2 layers,
3 heads) ``L = 6`` hidden states of ``D = 768``, 320 samples per frame. We expose the same list in that order.

Checkpoints: s3prl's ``{"Config": {"distiller": {...}, ...}, "Distiller": state_dict, "Optimizer", "Step", "Args",
...}`` with the key names of the modules above (``feature_extractor.conv_layers.{i}.0.weight``,
``feature_extractor.conv_layers.0.2.{weight,bias}`` (GroupNorm) or ``.{i}.2.1.{weight,bias}`` (LayerNorm),
``post_extract_proj.*``, ``encoder.pos_conv.0.{weight_g,weight_v,bias}``, ``encoder.layer_norm.*``,
``encoder.layers.{i}.self_attn.{q,k,v,out}_proj.*``, ``encoder.layers.{i}.{self_attn_layer_norm,fc1,fc2,
final_layer_norm}.*``, ``output_layer.0.*``, ``output_layer.2.{weight,bias}``); ours is ``config.json``
(:class:`DistilHuBERTConfig`) + ``model.safetensors`` with the same keys + ``speechbench.json``. Only the published
layout is supported: ``task_emb_type`` and ``out_layer_type`` "expand-last", ``attention_type`` "original",
``final_dim`` equal to ``encoder_embed_dim`` (every hidden state the same width).

Batch invariance: s3prl runs padded batches as they come, so the first conv's GroupNorm normalises over the padding
too and its features depend on the batch. As for the HF families (:mod:`upstreams.hf`), a padded batch here takes
that GroupNorm's statistics over each utterance's valid frames; padded frames are zeroed before the positional conv
and excluded from attention, so every utterance gets exactly its own unpadded forward.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from speechbench.common import SAMPLE_RATE
from speechbench.upstreams.base import UpstreamOutput, freeze
from speechbench.upstreams.checkpoints import CheckpointError, DetectedCheckpoint, config_from_dict, load_weights
from speechbench.upstreams.families import register_family
from speechbench.upstreams.hf import (
    conv_frame_lengths,
    group_norm_over_valid_frames,
    prepare_waveforms,
    receptive_field,
)

ACTIVATIONS = {"gelu": F.gelu, "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
               "tanh": torch.tanh, "linear": lambda x: x}
# s3prl's DistillerConfig defaults, for keys an s3prl config may omit (only those that shape the forward pass)
S3PRL_DEFAULTS = {
    "extractor_mode": "default", "extractor_conv_feature_layers": "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
    "conv_pos": 128, "conv_pos_groups": 16, "encoder_layers": 1, "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12, "activation_fn": "gelu", "layer_norm_first": False,
    "attention_type": "original", "final_dim": 768, "out_layer_type": "expand-last", "out_layer_inter_dim": -1,
    "n_tasks": 12, "task_emb_type": "expand-last",
}


@dataclass(frozen=True)
class DistilHuBERTConfig:
    """The architecture (defaults: the published ``distilhubert``, 2 layers and heads for HuBERT layers 4/8/12)."""

    extractor_mode: str = "default"  # "default" (GroupNorm on the first conv) | "layer_norm"
    conv_layers: tuple[tuple[int, int, int], ...] = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
    conv_pos: int = 128
    conv_pos_groups: int = 16
    encoder_layers: int = 2
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    n_tasks: int = 3  # prediction heads
    out_layer_inter_dim: int = 768  # width of each head's slice after the first Linear

    def __post_init__(self) -> None:
        if self.extractor_mode not in ("default", "layer_norm"):
            raise CheckpointError(f"DistilHuBERT extractor_mode {self.extractor_mode!r}: expected default or "
                                  f"layer_norm")
        if self.activation_fn not in ACTIVATIONS:
            raise CheckpointError(f"DistilHuBERT activation_fn {self.activation_fn!r}: expected one of "
                                  f"{', '.join(ACTIVATIONS)}")
        if self.encoder_layers < 1 or self.n_tasks < 1 or self.encoder_embed_dim % self.encoder_attention_heads:
            raise CheckpointError(f"DistilHuBERT needs >= 1 layer and head, and attention heads dividing the width; "
                                  f"got {self.encoder_layers} layers, {self.n_tasks} heads, {self.encoder_embed_dim}"
                                  f"-d / {self.encoder_attention_heads} attention heads")

    @classmethod
    def from_dict(cls, d: Mapping) -> DistilHuBERTConfig:
        """From our ``config.json``: every key must be a field."""
        d = dict(d)
        if "conv_layers" in d:  # JSON lists -> the tuples of the frozen dataclass
            d["conv_layers"] = tuple(tuple(int(x) for x in layer) for layer in d["conv_layers"])
        return config_from_dict(cls, d, "DistilHuBERT")

    @classmethod
    def from_s3prl(cls, distiller: Mapping) -> DistilHuBERTConfig:
        """From the ``distiller`` section of an s3prl checkpoint's ``Config`` (training-only keys are ignored)."""
        from speechbench.upstreams.fairseq_convert import parse_conv_layers

        c = {**S3PRL_DEFAULTS, **{k: v for k, v in distiller.items() if v is not None}}
        layout = (c["task_emb_type"], c["out_layer_type"], c["attention_type"])
        if layout != ("expand-last", "expand-last", "original"):
            raise CheckpointError(f"DistilHuBERT with task_emb_type={layout[0]!r}, out_layer_type={layout[1]!r}, "
                                  f"attention_type={layout[2]!r} is not supported (only the published layout: "
                                  f"expand-last, expand-last, original)")
        if int(c["final_dim"]) != int(c["encoder_embed_dim"]):
            raise CheckpointError(f"DistilHuBERT with final_dim {c['final_dim']} != encoder_embed_dim "
                                  f"{c['encoder_embed_dim']}: its hidden states would not share one width")
        inter = int(c["out_layer_inter_dim"])
        return cls(extractor_mode=str(c["extractor_mode"]),
                   conv_layers=tuple(parse_conv_layers(c["extractor_conv_feature_layers"])),
                   conv_pos=int(c["conv_pos"]), conv_pos_groups=int(c["conv_pos_groups"]),
                   encoder_layers=int(c["encoder_layers"]), encoder_embed_dim=int(c["encoder_embed_dim"]),
                   encoder_ffn_embed_dim=int(c["encoder_ffn_embed_dim"]),
                   encoder_attention_heads=int(c["encoder_attention_heads"]), activation_fn=str(c["activation_fn"]),
                   layer_norm_first=bool(c["layer_norm_first"]), n_tasks=int(c["n_tasks"]),
                   out_layer_inter_dim=inter if inter > 0 else int(c["encoder_embed_dim"]))

    def to_s3prl(self) -> dict:
        """The ``distiller`` section of an s3prl checkpoint's ``Config``."""
        spec = " + ".join(f"[{tuple(layer)}]" for layer in self.conv_layers)
        return {"extractor_mode": self.extractor_mode, "extractor_conv_feature_layers": spec,
                "conv_pos": self.conv_pos, "conv_pos_groups": self.conv_pos_groups,
                "encoder_layers": self.encoder_layers, "encoder_embed_dim": self.encoder_embed_dim,
                "encoder_ffn_embed_dim": self.encoder_ffn_embed_dim,
                "encoder_attention_heads": self.encoder_attention_heads, "activation_fn": self.activation_fn,
                "layer_norm_first": self.layer_norm_first, "attention_type": "original",
                "final_dim": self.encoder_embed_dim, "out_layer_type": "expand-last",
                "out_layer_inter_dim": self.out_layer_inter_dim, "n_tasks": self.n_tasks,
                "task_emb_type": "expand-last"}


class Transpose(nn.Module):
    """``[B, C, T] <-> [B, T, C]`` (fairseq's TransposeLast), so a LayerNorm can sit inside a conv block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(-2, -1)


def conv_block(n_in: int, n_out: int, kernel: int, stride: int, norm: str | None) -> nn.Sequential:
    """fairseq's block ``Sequential(conv, dropout, [norm], GELU)``: ``norm`` None, "group" or "layer"."""
    parts: list[nn.Module] = [nn.Conv1d(n_in, n_out, kernel, stride=stride, bias=False), nn.Identity()]
    if norm == "group":
        parts.append(nn.GroupNorm(n_out, n_out))
    elif norm == "layer":
        parts.append(nn.Sequential(Transpose(), nn.LayerNorm(n_out), Transpose()))
    return nn.Sequential(*parts, nn.GELU())


class FeatureExtractor(nn.Module):
    """wav2vec 2.0's CNN: ``forward(wavs [B, S], sample_lengths [B] | None) -> [B, C, T]``.

    With ``sample_lengths`` (a padded batch), the first block's GroupNorm uses each utterance's valid frames only.
    """

    def __init__(self, config: DistilHuBERTConfig) -> None:
        super().__init__()
        dims = [1] + [d for d, _, _ in config.conv_layers]
        layer_norm = config.extractor_mode == "layer_norm"
        self.conv_layers = nn.ModuleList(
            conv_block(dims[i], d, k, s, "layer" if layer_norm else ("group" if i == 0 else None))
            for i, (d, k, s) in enumerate(config.conv_layers))

    def forward(self, wavs: torch.Tensor, sample_lengths: torch.Tensor | None = None) -> torch.Tensor:
        x = wavs[:, None, :]
        for i, block in enumerate(self.conv_layers):
            conv, norm = block[0], block[2]
            if i == 0 and sample_lengths is not None and isinstance(norm, nn.GroupNorm):
                x = conv(x)
                frames = torch.div(sample_lengths - conv.kernel_size[0], conv.stride[0], rounding_mode="floor") + 1
                x = block[-1](group_norm_over_valid_frames(norm, x, frames.tolist()))
            else:
                x = block(x)
        return x


class WeightNormConv1d(nn.Module):
    """A grouped Conv1d under fairseq's weight norm over dim 2 (``weight = g * v / ||v||``, the norm over the
    output and input channels of each kernel tap), keeping the pickled names ``weight_g``, ``weight_v``, ``bias``."""

    def __init__(self, channels: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.randn(channels, channels // groups, kernel) / math.sqrt(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.groups, self.padding = groups, kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=(0, 1), keepdim=True)
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class SamePad(nn.Module):
    """Drop the extra last frame an even kernel with ``padding = kernel // 2`` produces."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : x.shape[-1] - self.remove]


class SelfAttention(nn.Module):
    """fairseq's MultiheadAttention (self-attention, biases on): ``forward(x [B, T, D], valid [B, T] bool)``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(proj: nn.Linear) -> torch.Tensor:
            return proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)  # [B, H, T, d]

        # padded keys are never attended to (fairseq's key_padding_mask); scaling 1/sqrt(d) as fairseq's q scaling
        out = F.scaled_dot_product_attention(split(self.q_proj), split(self.k_proj), split(self.v_proj),
                                             attn_mask=valid[:, None, None, :])
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    """fairseq's TransformerSentenceEncoderLayer: post-LN (default) or pre-LN (``layer_norm_first``)."""

    def __init__(self, config: DistilHuBERTConfig) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.self_attn = SelfAttention(dim, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = ACTIVATIONS[config.activation_fn]
        self.layer_norm_first = config.layer_norm_first

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), valid)
            return x + self.fc2(self.activation(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, valid))
        return self.final_layer_norm(x + self.fc2(self.activation(self.fc1(x))))


class Encoder(nn.Module):
    """``forward(x [B, T, D], valid [B, T]) -> (every layer's output, the encoder output)``."""

    def __init__(self, config: DistilHuBERTConfig) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.pos_conv = nn.Sequential(WeightNormConv1d(dim, config.conv_pos, config.conv_pos_groups),
                                      SamePad(config.conv_pos), nn.GELU())
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = config.layer_norm_first

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = x * valid[..., None].to(x.dtype)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        outputs = []
        for layer in self.layers:
            x = layer(x, valid)
            outputs.append(x)
        return outputs, self.layer_norm(x) if self.layer_norm_first else x


class SplitLinear(nn.Module):
    """One Linear(D', D_out) per task on its slice of the input: ``[B, T, N * D'] -> [B, T, N, D_out]``
    (s3prl's SplitLinear: ``weight [N, D', D_out]``, ``bias [1, 1, N, D_out]``; one task: a plain ``layer``)."""

    def __init__(self, in_dim: int, splits: int, out_dim: int) -> None:
        super().__init__()
        self.splits = splits
        if splits > 1:
            self.weight = nn.Parameter(torch.randn(splits, in_dim, out_dim) / math.sqrt(in_dim))
            self.bias = nn.Parameter(torch.zeros(1, 1, splits, out_dim))
        else:
            self.layer = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.splits == 1:
            return self.layer(x)[:, :, None, :]
        b, t, _ = x.shape
        return torch.einsum("btnd,nde->btne", x.reshape(b, t, self.splits, -1), self.weight) + self.bias


class DistilHuBERT(nn.Module):
    """The distiller with s3prl's key layout: ``forward(wavs [B, S], sample_lengths [B] | None) -> list of L
    [B, T, D]`` (``feat_final``, every layer's output, every head's prediction); padded frames are not zeroed."""

    def __init__(self, config: DistilHuBERTConfig) -> None:
        super().__init__()
        self.config = config
        dim, conv_dim = config.encoder_embed_dim, config.conv_layers[-1][0]
        self.feature_extractor = FeatureExtractor(config)
        self.post_extract_proj = nn.Linear(conv_dim, dim) if conv_dim != dim else None
        self.encoder = Encoder(config)
        inter = config.out_layer_inter_dim
        self.output_layer = nn.Sequential(nn.Linear(dim, inter * config.n_tasks), nn.GELU(),
                                          SplitLinear(inter, config.n_tasks, dim))

    def forward(self, wavs: torch.Tensor, sample_lengths: torch.Tensor | None = None) -> list[torch.Tensor]:
        padded = sample_lengths is not None and bool((sample_lengths < wavs.shape[1]).any())
        feats = self.feature_extractor(wavs, sample_lengths if padded else None).transpose(1, 2)  # [B, T, C]
        x = self.post_extract_proj(feats) if self.post_extract_proj is not None else feats
        kernels = tuple(k for _, k, _ in self.config.conv_layers)
        strides = tuple(s for _, _, s in self.config.conv_layers)
        frames = conv_frame_lengths(sample_lengths, kernels, strides) if sample_lengths is not None else \
            torch.full((wavs.shape[0],), x.shape[1])
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < frames.to(x.device)[:, None]
        layers, final = self.encoder(x, valid)
        predictions = self.output_layer(final)  # [B, T, N, D]
        return [x, *layers, *predictions.unbind(dim=2)]


class DistilHuBERTUpstream(nn.Module):
    """DistilHuBERT behind the upstream contract: ``forward(wavs [B, S], wav_lengths [B]) -> hidden [B, L, T, D]``.

    ``L = 1 + encoder_layers + n_tasks`` (6 for ``distilhubert``), ``D = encoder_embed_dim``, frames by the conv
    arithmetic (320 samples per frame; inputs shorter than the 400-sample receptive field count as 1 frame).
    """

    sample_rate: int = SAMPLE_RATE

    def __init__(self, model: DistilHuBERT, name: str = "distilhubert", checkpoint_format: str = "random",
                 checkpoint_sha256: str | None = None) -> None:
        super().__init__()
        config = model.config
        self.model = freeze(model.float())
        self.name, self.family = name, "distilhubert"
        self.num_layers = 1 + config.encoder_layers + config.n_tasks
        self.hidden_size = config.encoder_embed_dim
        self.conv_kernel = tuple(k for _, k, _ in config.conv_layers)
        self.conv_stride = tuple(s for _, _, s in config.conv_layers)
        self.downsample_rate = math.prod(self.conv_stride)
        self.receptive_field = receptive_field(self.conv_kernel, self.conv_stride)
        self.checkpoint_format, self.checkpoint_sha256 = checkpoint_format, checkpoint_sha256
        self.settings = dataclasses.asdict(config)

    def frame_lengths(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        return conv_frame_lengths(wav_lengths, self.conv_kernel, self.conv_stride)

    def forward(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> UpstreamOutput:
        wavs, wav_lengths = prepare_waveforms(self.name, wavs, wav_lengths, self.receptive_field)
        valid = wav_lengths.clamp_min(self.receptive_field)  # short inputs count as zero-padded to R
        hidden = torch.stack(self.model(wavs[:, : int(valid.max())], valid), dim=1)  # [B, L, T, D]
        frames = self.frame_lengths(wav_lengths)
        mask = torch.arange(hidden.shape[2], device=hidden.device)[None, :] < frames.to(hidden.device)[:, None]
        return UpstreamOutput(hidden=hidden * mask[:, None, :, None].to(hidden.dtype), lengths=frames)


POS_CONV_SPELLINGS = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}


def _load_state(model: DistilHuBERT, state: Mapping[str, torch.Tensor], source: str) -> None:
    state = {next((k.replace(new, old) for new, old in POS_CONV_SPELLINGS.items() if k.endswith(new)), k): v
             for k, v in state.items()}  # torch >= 2.1 weight-norm names -> the pickled ones
    load_weights(model, state, source, "DistilHuBERT")


def distilhubert_from_s3prl(payload: Mapping, name: str, source: str, sha256: str | None = None,
                            ) -> DistilHuBERTUpstream:
    """From an s3prl distiller checkpoint ``{"Config": {"distiller": ...}, "Distiller": state_dict, ...}``."""
    from speechbench.upstreams.checkpoints import to_plain

    config = to_plain(payload["Config"])
    if not isinstance(config, Mapping) or not isinstance(config.get("distiller"), Mapping):
        raise CheckpointError(f"{source}: s3prl DistilHuBERT checkpoint without Config.distiller")
    model = DistilHuBERT(DistilHuBERTConfig.from_s3prl(config["distiller"]))
    _load_state(model, payload["Distiller"], source)
    return DistilHuBERTUpstream(model, name, "s3prl", sha256)


def distilhubert_from_ours(config: Mapping, state: Mapping[str, torch.Tensor], name: str, source: str,
                           sha256: str | None = None) -> DistilHuBERTUpstream:
    model = DistilHuBERT(DistilHuBERTConfig.from_dict(config))
    _load_state(model, state, source)
    return DistilHuBERTUpstream(model, name, "speechbench", sha256)


def distilhubert_s3prl_checkpoint(model: DistilHuBERT) -> dict:
    """The s3prl layout of a model: ``{"Config": {"distiller": ...}, "Distiller": state_dict}`` (for ``torch.save``)."""
    return {"Config": {"distiller": model.config.to_s3prl()}, "Distiller": model.state_dict()}


@register_family("distilhubert", "DistilHuBERT", "HuBERT Base distilled into 2 transformer layers with prediction "
                 "heads for teacher layers 4/8/12 (s3prl's distiller, native); hidden states: the projected CNN "
                 "features, every layer's output and every head's prediction")
def load_distilhubert(detected: DetectedCheckpoint, name: str) -> DistilHuBERTUpstream:
    """The family loader: our format (``config.json`` + ``model.safetensors``) or s3prl's ``{Config, Distiller}``."""
    from speechbench.upstreams.checkpoints import load_speechbench_checkpoint

    if detected.format == "speechbench":
        return distilhubert_from_ours(*load_speechbench_checkpoint(detected.path), name, str(detected.path),
                                      detected.sha256)
    return distilhubert_from_s3prl(detected.payload, name, str(detected.path), detected.sha256)
