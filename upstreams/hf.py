"""wav2vec 2.0, HuBERT, WavLM and data2vec-audio upstreams through ``transformers`` (``Wav2Vec2Model``,
``HubertModel``, ``WavLMModel``, ``Data2VecAudioModel``).

The four share the wav2vec 2.0 layout (CNN feature extractor, feature projection, convolutional positional
embedding, transformer encoder); the differences that matter here: WavLM adds a gated relative position bias to the
attention of every layer (relative, so padding never changes it); data2vec-audio always uses a layer-norm feature
extractor, a post-LN encoder and a stack of positional conv layers (``conv_pos_kernel_size`` x
``num_conv_pos_embeddings``, each conv -> LayerNorm -> GELU) instead of one weight-normed conv.

Conventions (SUPERB / s3prl):

- **Hidden states**: the input of every transformer layer plus the encoder's final output, ``L = layers + 1``
  (13 Base, 25 Large). We build them as ``hidden_states[:-1] + (last_hidden_state,)``, which is that list for both
  encoder kinds and every ``transformers`` version:

  * post-LN encoders (Base, ``do_stable_layer_norm=False``): ``hidden_states[0]`` is ``LayerNorm(x + pos_conv(x))``,
    the input of layer 1; ``hidden_states[i]`` is the output of layer ``i``; the last equals ``last_hidden_state``.
  * pre-LN encoders (Large, "stable layer norm"): ``hidden_states[0]`` is ``x + pos_conv(x)`` (no norm: each layer
    normalises its own input) and ``hidden_states[i]`` the raw residual stream after layer ``i``. The encoder output
    is ``encoder.layer_norm`` of the last layer's output. ``transformers`` 5 returns the *un-normalised* last layer
    output as ``hidden_states[-1]`` (4.x returned the normalised one), so we always take ``last_hidden_state``
    instead: the fairseq encoder output that s3prl's hooks expose.
- **Layer drop** off (``config.layerdrop = 0``), eval mode, no gradients, no SpecAugment masking (eval).
- **Attention mask** only for checkpoints whose feature extractor uses layer norm (``feat_extract_norm ==
  "layer"``: the Large models, and every data2vec-audio model, whose config has no ``feat_extract_norm``); Base
  models (group norm) were trained without one.
- **Waveform normalisation** (zero mean, unit variance per utterance over its valid samples) only where the
  checkpoint asks: HF ``preprocessor_config.json`` ``do_normalize`` (eps 1e-7, as ``Wav2Vec2FeatureExtractor``),
  fairseq/s3prl ``task.normalize`` (eps 1e-5, as fairseq's ``F.layer_norm``), our ``speechbench.json``
  ``normalize``; a checkpoint without any of these is not normalised.
- **Frames**: ``downsample_rate`` = product of the conv strides (320); valid frames by the conv arithmetic
  ``n <- (n - kernel) // stride + 1`` per conv layer (``_get_feat_extract_output_lengths``). Inputs shorter than the
  receptive field (400 samples) are zero-padded to it (1 frame). Padded frames are zero.
- **Batch invariance**: every output equals the utterance's own unpadded forward. A layer-norm model with its
  attention mask gives that directly. A group-norm (Base) model fed a padded batch without attention mask does not
  (its first conv's GroupNorm normalises each channel over time, padding included, and attention sees the padded
  frames); s3prl accepts that, so its Base features depend on the batch. We make padded batches exact instead:
  for the forward of a padded batch, that GroupNorm is swapped for one whose statistics come from each utterance's
  valid frames (:class:`ValidFrameGroupNorm`, computed in float32 as autocast computes group norms), and the frame
  mask goes to the encoder (padded frames zeroed before the positional conv, excluded from
  attention). Each utterance then sees exactly what it sees alone, where the convention (no mask, no padding) holds
  trivially; batches of equal lengths run untouched. Should a future ``transformers`` change that layer's layout,
  we fall back to sub-batches of equal-length utterances (also exact, slower on variable lengths); so we do for a
  positional embedding of an unknown layout.
  data2vec-audio's stacked positional convs need one more step: the encoder zeroes padded frames only before the
  first of them, so the later ones would read the (non-zero) padded outputs of the earlier ones near the end of a
  short utterance; for a padded batch, a pre-hook zeroes the padded frames at the input of every positional conv
  layer, which is what the utterance alone sees (the conv's own zero padding).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from speechbench.common import SAMPLE_RATE, sha256_file
from speechbench.upstreams.base import UpstreamOutput, freeze
from speechbench.upstreams.checkpoints import (
    CheckpointError,
    DetectedCheckpoint,
    weight_file,
    write_speechbench_json,
)
from speechbench.upstreams.families import family_for_model_type, get_family, hf_model_types, register_family

log = logging.getLogger("speechbench")

HF_NORM_EPS = 1e-7  # transformers Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
FAIRSEQ_NORM_EPS = 1e-5  # fairseq / s3prl: F.layer_norm(wav, wav.shape)


def model_class(family: str) -> type[nn.Module]:
    """The ``transformers`` model class of a registered family (``HubertModel`` for ``hubert``)."""
    import transformers

    class_name = get_family(family).hf_model_class
    if class_name is None:
        raise ValueError(f"family {family!r} is not served through transformers")
    return getattr(transformers, class_name)


def normalize_waveforms(wavs: torch.Tensor, wav_lengths: torch.Tensor, eps: float) -> torch.Tensor:
    """Zero mean, unit (population) variance per utterance over its valid samples; padding stays 0. ``[B, S]``."""
    mask = (torch.arange(wavs.shape[1], device=wavs.device)[None, :] < wav_lengths[:, None]).to(wavs.dtype)
    count = wav_lengths.to(wavs.dtype).clamp_min(1.0)[:, None]
    mean = (wavs * mask).sum(1, keepdim=True) / count
    var = ((wavs - mean) * mask).square().sum(1, keepdim=True) / count
    return (wavs - mean) / torch.sqrt(var + eps) * mask


def receptive_field(kernels: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Input samples that one output frame of a stack of (kernel, stride) convolutions sees (400 for wav2vec 2.0)."""
    return 1 + sum((k - 1) * math.prod(strides[:i]) for i, k in enumerate(kernels))


def conv_frame_lengths(wav_lengths: torch.Tensor, kernels: tuple[int, ...], strides: tuple[int, ...]) -> torch.Tensor:
    """Valid frames per utterance by the conv arithmetic ``n <- (n - kernel) // stride + 1``; inputs shorter than the
    receptive field count as zero-padded to it (1 frame). ``[B] -> [B]``."""
    n = torch.as_tensor(wav_lengths).long().clamp_min(receptive_field(kernels, strides))
    for k, s in zip(kernels, strides, strict=True):
        n = torch.div(n - k, s, rounding_mode="floor") + 1
    return n


def prepare_waveforms(name: str, wavs: torch.Tensor, wav_lengths: torch.Tensor, min_samples: int,
                      normalize: bool = False, norm_eps: float = HF_NORM_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a padded batch ``wavs [B, S]`` + ``wav_lengths [B]``; return float waveforms with zero padding (or
    normalised per utterance over its valid samples), right-padded with zeros to at least ``min_samples``, and the
    lengths as int64."""
    if wavs.dim() != 2:
        raise ValueError(f"{name}: wavs must be [B, S]; got shape {tuple(wavs.shape)}")
    wav_lengths = torch.as_tensor(wav_lengths, device=wavs.device).long()
    if wav_lengths.shape != (wavs.shape[0],) or (wavs.shape[0] and (int(wav_lengths.min()) < 1 or
                                                                    int(wav_lengths.max()) > wavs.shape[1])):
        raise ValueError(f"{name}: wav_lengths must be [B] in [1, {wavs.shape[1]}]; got {wav_lengths.tolist()}")
    wavs = wavs.float()
    if normalize:
        wavs = normalize_waveforms(wavs, wav_lengths, norm_eps)
    else:
        wavs = wavs * (torch.arange(wavs.shape[1], device=wavs.device)[None, :] < wav_lengths[:, None])
    if wavs.shape[1] < min_samples:
        wavs = nn.functional.pad(wavs, (0, min_samples - wavs.shape[1]))
    return wavs, wav_lengths


def extractor_uses_layer_norm(config) -> bool:
    """Whether a transformers config's feature extractor is the layer-norm kind (data2vec-audio's always is)."""
    return getattr(config, "feat_extract_norm", "layer") == "layer"


def group_norm_over_valid_frames(norm: nn.GroupNorm, x: torch.Tensor, frames: list[int]) -> torch.Tensor:
    """A per-channel GroupNorm (``num_groups == num_channels``) whose statistics use each utterance's first
    ``frames[b]`` frames only, as if it ran alone. ``x [B, C, T] -> [B, C, T]`` (padded frames get values too).
    Computed in float32 (under autocast, PyTorch runs group norms in float32 too)."""
    x = x.float()
    # two passes (mean, then mean squared deviation): as exact as torch.var_mean and ~3x faster on CPU
    mean = torch.stack([x[b, :, :n].mean(-1) for b, n in enumerate(frames)])[..., None]
    var = torch.stack([(x[b, :, :n] - mean[b]).square_().mean(-1) for b, n in enumerate(frames)])[..., None]
    scale = torch.rsqrt(var + norm.eps) * norm.weight[:, None]
    return torch.addcmul(norm.bias[:, None] - mean * scale, x, scale)  # one pass over [B, C, T]


class ValidFrameGroupNorm(nn.Module):
    """Stands in for a per-channel ``GroupNorm`` during the forward of a padded batch: the same affine parameters,
    statistics over each utterance's first ``frames[b]`` frames (:func:`group_norm_over_valid_frames`)."""

    def __init__(self, norm: nn.GroupNorm, frames: list[int]):
        super().__init__()
        self.norm, self.frames = norm, frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_over_valid_frames(self.norm, x, self.frames)


class HFUpstream(nn.Module):
    """A frozen ``Wav2Vec2Model`` / ``HubertModel`` / ``WavLMModel`` / ``Data2VecAudioModel`` behind the upstream
    contract.

    ``forward(wavs [B, S], wav_lengths [B]) -> UpstreamOutput(hidden [B, L, T, D], lengths [B])`` with
    ``L = num_hidden_layers + 1``, ``D = hidden_size``, ``lengths = frame_lengths(wav_lengths)``, ``T = max(lengths)``.
    """

    sample_rate: int = SAMPLE_RATE

    def __init__(self, model: nn.Module, name: str, family: str, normalize: bool, norm_eps: float = HF_NORM_EPS,
                 checkpoint_format: str = "random", checkpoint_sha256: str | None = None) -> None:
        super().__init__()
        config = model.config
        config.layerdrop = 0.0
        self.model = freeze(model.float())
        self.name, self.family = name, family
        self.num_layers = int(config.num_hidden_layers) + 1
        self.hidden_size = int(config.hidden_size)
        self.conv_kernel = tuple(int(k) for k in config.conv_kernel)
        self.conv_stride = tuple(int(s) for s in config.conv_stride)
        self.downsample_rate = math.prod(self.conv_stride)
        self.receptive_field = receptive_field(self.conv_kernel, self.conv_stride)
        self.use_attention_mask = extractor_uses_layer_norm(config)
        self.pre_layer_norm = bool(getattr(config, "do_stable_layer_norm", False))
        self.normalize, self.norm_eps = bool(normalize), float(norm_eps)
        self.checkpoint_format, self.checkpoint_sha256 = checkpoint_format, checkpoint_sha256
        self._masked_norm = None if self.use_attention_mask else self._group_norm_layer()
        pos_conv = getattr(getattr(self.model, "encoder", None), "pos_conv_embed", None)
        self._pos_conv_layers = list(getattr(pos_conv, "layers", None) or [])  # data2vec-audio's stacked convs
        # a positional embedding of a layout we do not know might mix padding into valid frames: never pad it
        self._pos_conv_known = hasattr(pos_conv, "conv") or bool(self._pos_conv_layers)
        self.settings = {"family": family, "normalize": self.normalize, "norm_eps": self.norm_eps,
                         "attention_mask": self.use_attention_mask, "pre_layer_norm": self.pre_layer_norm}

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, family={self.family}, num_layers={self.num_layers}, "
                f"hidden_size={self.hidden_size}, normalize={self.normalize}, attention_mask={self.use_attention_mask}")

    def frame_lengths(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        """Valid frames per utterance by the conv arithmetic (inputs shorter than the receptive field count as it)."""
        return conv_frame_lengths(wav_lengths, self.conv_kernel, self.conv_stride)

    def _group_norm_layer(self) -> nn.GroupNorm | None:
        """The first conv layer's per-channel GroupNorm of a group-norm feature extractor (None if not found)."""
        layers = getattr(getattr(self.model, "feature_extractor", None), "conv_layers", None)
        norm = getattr(layers[0], "layer_norm", None) if layers is not None and len(layers) else None
        if isinstance(norm, nn.GroupNorm) and norm.num_groups == norm.num_channels and norm.affine:
            return norm
        return None

    def _groups(self, wav_lengths: torch.Tensor) -> list[torch.Tensor]:
        lengths = wav_lengths.clamp_min(self.receptive_field)
        exact_padding = self._pos_conv_known and (self.use_attention_mask or self._masked_norm is not None)
        if exact_padding or bool((lengths == lengths[0]).all()):
            return [torch.arange(wav_lengths.shape[0])]
        return [torch.nonzero(lengths == n).flatten() for n in torch.unique(lengths)]

    @contextmanager
    def _exact_padding(self, sample_lengths: torch.Tensor) -> Iterator[None]:
        """While active (the forward of a padded batch), each utterance sees what it sees alone: the first GroupNorm
        normalises it over its own valid frames (swapped for a :class:`ValidFrameGroupNorm`, so the full-length
        statistics are never computed), and every stacked positional conv layer reads zeros past its valid
        frames."""
        handles = []
        conv0 = self.model.feature_extractor.conv_layers[0] if self._masked_norm is not None else None
        if conv0 is not None:
            first = torch.div(sample_lengths - self.conv_kernel[0], self.conv_stride[0], rounding_mode="floor") + 1
            conv0.layer_norm = ValidFrameGroupNorm(self._masked_norm, first.tolist())
        if len(self._pos_conv_layers) > 1:
            frames = self.frame_lengths(sample_lengths)

            def zero_padding(module: nn.Module, inputs: tuple) -> tuple:
                x = inputs[0]  # [B, D, T] encoder frames
                valid = torch.arange(x.shape[-1], device=x.device)[None, :] < frames.to(x.device)[:, None]
                return (x * valid[:, None, :].to(x.dtype),)

            handles += [layer.register_forward_pre_hook(zero_padding) for layer in self._pos_conv_layers]
        try:
            yield
        finally:
            if conv0 is not None:
                conv0.layer_norm = self._masked_norm
            for handle in handles:
                handle.remove()

    def forward(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> UpstreamOutput:
        wavs, wav_lengths = prepare_waveforms(self.name, wavs, wav_lengths, self.receptive_field, self.normalize,
                                              self.norm_eps)
        frames = self.frame_lengths(wav_lengths)
        total = int(frames.max()) if frames.numel() else 0
        groups = self._groups(wav_lengths.cpu())
        hidden = wavs.new_zeros(wavs.shape[0], self.num_layers, total, self.hidden_size) if len(groups) > 1 else None
        for idx in groups:
            idx = idx.to(wavs.device)
            valid = wav_lengths[idx].clamp_min(self.receptive_field)  # short inputs count as zero-padded to R
            n = int(valid.max())
            padded = bool((valid < n).any())
            mask = (torch.arange(n, device=wavs.device)[None, :] < valid[:, None]).long() \
                if self.use_attention_mask or padded else None
            with self._exact_padding(valid) if padded else nullcontext(), warnings.catch_warnings():
                # WavLM's attention hands torch a bool padding mask beside its float position bias (exact; torch
                # only deprecates mixing the two types)
                warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask and attn_mask")
                out = self.model(wavs[idx, :n], attention_mask=mask, output_hidden_states=True)
            states = torch.stack(tuple(out.hidden_states[:-1]) + (out.last_hidden_state,), dim=1)  # [b, L, t, D]
            if len(idx) == wavs.shape[0] and states.shape[2] == total:
                hidden = states  # one group holding the whole batch, in order
            else:
                hidden[idx, :, : states.shape[2]] = states
        for b, n in enumerate(frames.tolist()):
            if n < total:
                hidden[b, :, n:] = 0.0  # padded frames
        return UpstreamOutput(hidden=hidden, lengths=frames)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _dir_normalize(path: Path, meta: dict | None) -> tuple[bool, str]:
    if meta and "normalize" in meta:
        return bool(meta["normalize"]), f"{path.name}/speechbench.json"
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        try:
            cfg = json.loads(pre.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{pre}: unreadable ({type(e).__name__}: {e})") from None
        return bool(cfg.get("do_normalize", True)), "preprocessor_config.json do_normalize"
    return False, "no preprocessor_config.json"


def load_hf_directory(path: str | os.PathLike, name: str, checkpoint_format: str = "hf-dir",
                      sha256: str | None = None, meta: dict | None = None) -> HFUpstream:
    """An upstream from a local HF directory (``config.json`` + weights [+ ``preprocessor_config.json``])."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: unreadable ({type(e).__name__}: {e})") from None
    found = family_for_model_type(config.get("model_type"))
    if found is None:
        raise CheckpointError(f"{path}: model_type {config.get('model_type')!r} is not one of "
                              f"{', '.join(hf_model_types())}")
    family = found.name
    weights = weight_file(path)
    if weights is None:
        raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin")
    try:
        with _quiet_transformers():
            model = model_class(family).from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: transformers could not load it ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    normalize, why = _dir_normalize(path, meta)
    log.info("%s: %s model, waveform normalisation %s (%s), attention mask %s", path, family,
             "on" if normalize else "off", why, "on" if extractor_uses_layer_norm(model.config) else "off")
    return HFUpstream(model, name, family, normalize, HF_NORM_EPS, checkpoint_format,
                      sha256 or sha256_file(weights))


def load_fairseq(detected: DetectedCheckpoint, name: str) -> HFUpstream:
    """An upstream from a fairseq or s3prl-converted wav2vec2/HuBERT pickle, converted by the key map."""
    from speechbench.upstreams.fairseq_convert import fairseq_to_hf_model

    model, normalize = fairseq_to_hf_model(detected.payload, detected.family, str(detected.path))
    log.info("%s: converted %s to transformers (%d layers, %d-d), waveform normalisation %s (task.normalize)",
             detected.path, detected.label, model.config.num_hidden_layers, model.config.hidden_size,
             "on" if normalize else "off")
    return HFUpstream(model, name, detected.family, normalize, FAIRSEQ_NORM_EPS, detected.format, detected.sha256)


def save_hf_checkpoint(model: nn.Module, out_dir: str | os.PathLike, normalize: bool, extra: dict | None = None
                       ) -> Path:
    """Write our format for wav2vec2/HuBERT: an HF directory (``config.json``, ``model.safetensors``,
    ``preprocessor_config.json``) plus ``speechbench.json`` (written last, so its presence means complete) holding
    ``normalize`` and the items of ``extra``."""
    from transformers import Wav2Vec2FeatureExtractor

    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    Wav2Vec2FeatureExtractor(do_normalize=normalize, return_attention_mask=extractor_uses_layer_norm(model.config),
                             sampling_rate=SAMPLE_RATE).save_pretrained(str(out_dir))
    write_speechbench_json(out_dir, model.config.model_type, {"normalize": bool(normalize), **(extra or {})})
    return out_dir


def load_transformers_checkpoint(detected: DetectedCheckpoint, name: str) -> HFUpstream:
    """The family loader of the transformers families: an HF or speechbench directory, or a fairseq, s3prl or unilm
    pickle (converted by :mod:`upstreams.fairseq_convert`)."""
    if detected.format in ("hf-dir", "speechbench"):
        return load_hf_directory(detected.path, name, detected.format, detected.sha256, detected.info)
    return load_fairseq(detected, name)


register_family("wav2vec2", "wav2vec 2.0", "masked contrastive prediction over quantised CNN latents (transformers "
                "Wav2Vec2Model); hidden states: every transformer layer's input plus the encoder output",
                hf_model_type="wav2vec2", hf_model_class="Wav2Vec2Model", pretrain=True)(load_transformers_checkpoint)
register_family("hubert", "HuBERT", "masked prediction of k-means cluster ids (transformers HubertModel); hidden "
                "states: every transformer layer's input plus the encoder output",
                hf_model_type="hubert", hf_model_class="HubertModel", pretrain=True)(load_transformers_checkpoint)
register_family("wavlm", "WavLM", "masked prediction of k-means cluster ids on denoised, overlapped speech, with "
                "a gated relative position bias in every attention layer (transformers WavLMModel); hidden states: "
                "every transformer layer's input plus the encoder output",
                hf_model_type="wavlm", hf_model_class="WavLMModel")(load_transformers_checkpoint)
register_family("data2vec_audio", "data2vec (audio)", "regression of the averaged top layers of an EMA teacher "
                "(transformers Data2VecAudioModel); hidden states: every transformer layer's input plus the encoder "
                "output", hf_model_type="data2vec-audio", hf_model_class="Data2VecAudioModel",
                )(load_transformers_checkpoint)
