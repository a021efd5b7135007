"""wav2vec 2.0 pretraining (Baevski et al. 2020) on ``transformers``' ``Wav2Vec2ForPreTraining``.

The trained module is ``Wav2Vec2ForPreTraining``: the upstream ``Wav2Vec2Model`` (conv feature encoder, transformer,
``masked_spec_embed``) plus the pretraining-only parts (Gumbel product quantiser, ``project_q``, ``project_hid``).
One step, for equal-length crops ``wavs [B, S]``:

1. waveform normalisation when ``normalize`` is on, exactly as the HF loader does at evaluation time
   (:func:`upstreams.hf.normalize_waveforms` with :data:`upstreams.hf.HF_NORM_EPS`);
2. span masks on the ``T`` conv frames (:func:`span_mask`, fairseq-style: ``int(p * T / M + U[0, 1))`` span starts,
   at least ``mask_min_spans``, drawn without replacement, spans of ``M`` frames that may overlap) and
   ``num_negatives`` distractors per masked frame from the other masked frames of the same utterance
   (:func:`sample_negatives`), both from torch's RNG so a run is reproducible from its seed (and resumable: the loop
   checkpoints the torch RNG);
3. ``Wav2Vec2ForPreTraining.forward`` replaces the masked frames by ``masked_spec_embed`` before the transformer and
   returns ``contrastive_loss`` (cross entropy over ``[positive, negatives]`` cosine logits / temperature, summed over
   masked frames) and ``diversity_loss`` (``(G V - perplexity) / (G V)`` times the number of masked frames);
4. our loss is that sum divided by the number of masked frames (as fairseq normalises by its sample size), so its
   scale does not depend on the batch size: ``contrastive per masked frame + diversity_loss_weight * (G V - ppl) /
   (G V)``.

The Gumbel-softmax temperature decays per training forward (one per optimiser update in the loop) as in fairseq:
``max(end, start * decay ** updates)``; ``updates`` is a buffer, so a resumed run continues the schedule.
fairseq's 2 -> 0.5 by 0.999995 takes 277k updates; our default decay 0.999 reaches 0.5 after ~1400 updates.

Differences from fairseq worth knowing: no L2 penalty on the conv features (``features_pen``), no equalising of the
number of masked frames across the batch (fairseq's ``require_same_masks`` subsamples masked frames, breaking spans;
HF's loss takes any count per utterance), ``feature_grad_mult`` (fairseq Base 0.1) is a gradient scale on the conv
encoder output implemented here with a forward hook, and the conv feature encoder starts smooth
(:func:`smooth_feature_encoder_`, ``feature_encoder_init="smooth"``; ``"kaiming"`` is HF's / fairseq's init).

Why the smooth start: with kaiming kernels the initial conv features of a steady vowel depend on the phase at which
each 20 ms hop samples the pitch period, so the quantiser gives it a new code almost every frame (on the synthetic
corpus neighbouring frames share a code about as often as random frames of the utterance). Such targets cannot be
predicted from the context; the cheapest way down is a context vector that is constant and orthogonal to every target,
which puts the contrastive loss at exactly ``ln(1 + K)`` and leaves no gradient that could make the targets smoother.
fairseq-size runs (over an hour of audio per update) get past it in time; a few hundred 32 s updates do not. The tiny
recipe also masks short spans (``mask_time_length=3``): after the smooth start, codes stay predictable over 2-3 frames
(about a phone), not from 5-10 frames away, which is where a 10-frame span leaves most of its frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from speechbench.upstreams.hf import HF_NORM_EPS, normalize_waveforms, save_hf_checkpoint
from speechbench.upstreams.pretrain.base import Objective, ObjectiveOutput, register_objective
from speechbench.upstreams.pretrain.transformer import TransformerOptions, config_kwargs


@dataclass(frozen=True)
class Wav2Vec2ModelOptions(TransformerOptions):
    """Architecture: the shared transformer fields plus the quantiser (fields of ``Wav2Vec2Config``). Defaults: the
    bundled size, ~316k exported parameters (1.3 MB). Base adds ``codevector_dim=256, proj_codevector_dim=256,
    num_codevectors_per_group=320`` to :class:`TransformerOptions`' Base values."""

    codevector_dim: int = 64  # quantiser output (all groups concatenated); divisible by num_codevector_groups
    proj_codevector_dim: int = 64  # the space where context and quantised targets are compared
    num_codevector_groups: int = 2
    num_codevectors_per_group: int = 64
    feat_quantizer_dropout: float = 0.0


@dataclass(frozen=True)
class Wav2Vec2ObjectiveOptions:
    """Loss settings (fairseq Base values in comments)."""

    mask_time_prob: float = 0.65  # fraction of frames drawn as span starts (0.65)
    mask_time_length: int = 10  # span length M in frames (10)
    mask_min_spans: int = 2  # at least this many span starts per utterance (2)
    num_negatives: int = 50  # distractors per masked frame (100; a 2 s crop has only ~50 masked frames)
    contrastive_logits_temperature: float = 0.1  # (0.1)
    diversity_loss_weight: float = 0.1  # (0.1)
    gumbel_temperature_start: float = 2.0  # (2.0)
    gumbel_temperature_end: float = 0.5  # (0.5)
    gumbel_temperature_decay: float = 0.999  # per update (0.999995 over 400k updates)
    feature_grad_mult: float = 1.0  # gradient scale into the conv feature encoder (0.1); 1 = plain
    feature_encoder_init: str = "smooth"  # "smooth" (see smooth_feature_encoder_) | "kaiming" (HF / fairseq)
    smooth_init_noise: float = 0.1  # "smooth": weight of the kaiming part left in each kernel


def gumbel_temperature(updates: int, start: float, end: float, decay: float) -> float:
    """fairseq's schedule: ``max(end, start * decay ** updates)``."""
    return max(end, start * decay ** updates)


def conv_frames(num_samples: int, kernels: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Frames of the conv feature encoder for ``num_samples`` (``n <- (n - kernel) // stride + 1`` per layer)."""
    n = num_samples
    for k, s in zip(kernels, strides, strict=True):
        n = (n - k) // s + 1
    return n


def sample_span_starts(batch: int, frames: int, mask_prob: float, span: int, min_spans: int = 2,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Span starts ``bool [B, T]``: per utterance ``n = max(min_spans, int(mask_prob * T / span + U[0, 1)))`` distinct
    positions drawn uniformly from the ``T - span + 1`` starts whose span fits (``n`` capped at that number)."""
    if not 1 <= span <= frames:
        raise ValueError(f"mask span {span} must be in [1, {frames}] (the number of frames)")
    positions = frames - span + 1
    counts = (mask_prob * frames / span + torch.rand(batch, generator=generator)).long()
    counts = counts.clamp_min(min_spans).clamp_max(positions)
    scores = torch.rand(batch, positions, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # a uniformly random permutation of the positions per row
    starts = torch.zeros(batch, frames, dtype=torch.bool)
    starts[:, :positions] = ranks < counts[:, None]
    return starts


def spans_from_starts(starts: torch.Tensor, span: int) -> torch.Tensor:
    """``bool [B, T]``: frame ``t`` is masked when a span starts in ``[t - span + 1, t]``."""
    covered = starts.long().cumsum(dim=1)
    before = nn.functional.pad(covered, (span, 0))[:, : starts.shape[1]]  # starts up to t - span
    return covered > before


def span_mask(batch: int, frames: int, mask_prob: float, span: int, min_spans: int = 2,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """fairseq-style time mask ``bool [B, T]``: the union of possibly overlapping ``span``-frame spans.

    Expected masked fraction away from the edges is about ``1 - (1 - mask_prob / span) ** span`` (0.49 for 0.65 and
    10); every masked run is at least ``span`` frames long.
    """
    return spans_from_starts(sample_span_starts(batch, frames, mask_prob, span, min_spans, generator), span)


def sample_negatives(mask: torch.Tensor, num_negatives: int, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """Distractor indices ``long [B, T, K]`` into the flattened ``B * T`` frames, as ``Wav2Vec2ForPreTraining`` takes.

    For a masked frame: ``K`` frames drawn uniformly with replacement from the *other* masked frames of the same
    utterance (fairseq / HF). For an unmasked frame (ignored by the loss): the frame itself.
    """
    batch, frames = mask.shape
    counts = mask.sum(dim=1)  # [B]
    if bool((counts < 2).any()):
        raise ValueError("every utterance needs at least 2 masked frames to draw negatives from")
    rank = mask.long().cumsum(dim=1) - 1  # [B, T] index of a masked frame among its utterance's masked frames
    draw = (torch.rand(batch, frames, num_negatives, generator=generator) * (counts - 1)[:, None, None]).long()
    draw = draw + (draw >= rank[..., None]).long()  # skip the positive itself, keeping the others uniform
    masked_frames = torch.argsort((~mask).long(), dim=1, stable=True)  # [B, T] masked frame indices first, in order
    chosen = masked_frames.gather(1, draw.reshape(batch, -1)).reshape(batch, frames, num_negatives)
    own = torch.arange(frames)[None, :, None].expand_as(chosen)
    chosen = torch.where(mask[..., None], chosen, own)
    return chosen + (torch.arange(batch) * frames)[:, None, None]


def build_config(model: Wav2Vec2ModelOptions, objective: Wav2Vec2ObjectiveOptions):
    """The ``Wav2Vec2Config`` of these options (pretraining masks come from :func:`span_mask`)."""
    from transformers import Wav2Vec2Config

    return Wav2Vec2Config(
        **config_kwargs(model), codevector_dim=model.codevector_dim, proj_codevector_dim=model.proj_codevector_dim,
        num_codevector_groups=model.num_codevector_groups, num_codevectors_per_group=model.num_codevectors_per_group,
        feat_quantizer_dropout=model.feat_quantizer_dropout, num_negatives=objective.num_negatives,
        contrastive_logits_temperature=objective.contrastive_logits_temperature,
        diversity_loss_weight=objective.diversity_loss_weight)


FEATURE_ENCODER_INITS = ("smooth", "kaiming")


@torch.no_grad()
def smooth_feature_encoder_(conv_layers: nn.ModuleList, noise: float) -> None:
    """Re-initialise every strided conv after the first as a moving average over its taps of a random channel mix.

    Each kernel ``[C_out, C_in, k]`` becomes ``M / k + noise * N`` with ``M [C_out, C_in, 1]`` and ``N`` kaiming
    normal (``std sqrt(2 / fan_in)``, ``M``'s std ``sqrt(2 / C_in)``: the same output scale for a slowly varying
    input). Why: with kaiming kernels every output frame mixes a few instants of the rectified first-layer filter
    outputs with random signs, so it depends on the phase at which the 20 ms hop samples each pitch period; a steady
    vowel then gets a different quantiser code every frame (neighbouring frames agree about as often as random
    frames), the targets are unpredictable, the context network collapses to a constant and the contrastive loss
    sits at ``ln(K + 1)`` with no gradient left to make the targets smoother. Averaging the taps makes the encoder
    start as smoothed rectified filterbank envelopes, which change only with the sound.
    """
    for layer in conv_layers[1:]:
        weight = layer.conv.weight
        out_channels, in_channels, taps = weight.shape
        mix = torch.randn(out_channels, in_channels, 1) * (2.0 / in_channels) ** 0.5
        kaiming = torch.randn(weight.shape) * (2.0 / (in_channels * taps)) ** 0.5
        weight.copy_(mix.expand_as(weight) / taps + noise * kaiming)


class Wav2Vec2Objective(Objective):
    """Masked contrastive prediction of Gumbel-quantised conv features (see the module docstring)."""

    family = "wav2vec2"

    def __init__(self, model: Wav2Vec2ModelOptions, objective: Wav2Vec2ObjectiveOptions) -> None:
        super().__init__()
        from transformers import Wav2Vec2ForPreTraining

        if not (objective.mask_time_prob >= 0 and objective.mask_time_length >= 1 and objective.num_negatives >= 1):
            raise ValueError(f"wav2vec2: invalid masking/negatives settings {objective}")
        if objective.feature_encoder_init not in FEATURE_ENCODER_INITS:
            choices = ", ".join(FEATURE_ENCODER_INITS)
            raise ValueError(f"wav2vec2: objective.feature_encoder_init must be one of {choices}, "
                             f"got {objective.feature_encoder_init!r}")
        self.model_options, self.objective_options = model, objective
        self.model = Wav2Vec2ForPreTraining(build_config(model, objective))
        if objective.feature_encoder_init == "smooth":
            smooth_feature_encoder_(self.model.wav2vec2.feature_extractor.conv_layers, objective.smooth_init_noise)
        self.register_buffer("gumbel_updates", torch.zeros((), dtype=torch.long))  # training forwards so far
        if objective.feature_grad_mult != 1.0:
            self.model.wav2vec2.feature_extractor.register_forward_hook(self._scale_feature_grad)

    def _scale_feature_grad(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        mult = self.objective_options.feature_grad_mult  # forward value unchanged, gradient times mult
        return output * mult + output.detach() * (1.0 - mult)

    @property
    def gumbel_temperature(self) -> float:
        """The temperature the next training forward uses."""
        o = self.objective_options
        return gumbel_temperature(int(self.gumbel_updates), o.gumbel_temperature_start, o.gumbel_temperature_end,
                                  o.gumbel_temperature_decay)

    def num_frames(self, num_samples: int) -> int:
        return conv_frames(num_samples, self.model_options.conv_kernel, self.model_options.conv_stride)

    def forward(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> ObjectiveOutput:
        """``wavs [B, S]`` equal-length crops (``wav_lengths [B]`` all ``S``) -> loss per masked frame and stats."""
        wav_lengths = torch.as_tensor(wav_lengths, device=wavs.device).long()
        if wavs.dim() != 2 or bool((wav_lengths != wavs.shape[1]).any()):
            raise ValueError("wav2vec2 pretraining takes equal-length crops: wavs [B, S] with every length S")
        wavs = wavs.float()
        if self.model_options.normalize:
            wavs = normalize_waveforms(wavs, wav_lengths, HF_NORM_EPS)
        o = self.objective_options
        frames = self.num_frames(wavs.shape[1])
        mask = span_mask(wavs.shape[0], frames, o.mask_time_prob, o.mask_time_length, o.mask_min_spans)
        negatives = sample_negatives(mask, o.num_negatives)
        mask, negatives = mask.to(wavs.device), negatives.to(wavs.device)
        temperature = self.gumbel_temperature
        self.model.set_gumbel_temperature(temperature)  # only used in training mode (eval takes the argmax code)
        out = self.model(wavs, mask_time_indices=mask, sampled_negative_indices=negatives)
        if self.training:
            self.gumbel_updates += 1
        masked = mask.sum()
        stats = {
            "contrastive_loss": float(out.contrastive_loss.detach() / masked),
            "diversity_loss": float(out.diversity_loss.detach() / masked),  # (G V - perplexity) / (G V)
            "code_perplexity": float(out.codevector_perplexity.detach()),  # summed over groups, at most G V
            "accuracy": contrastive_accuracy(out.projected_states, out.projected_quantized_states, mask, negatives),
            "identical_negatives": identical_negatives(out.projected_quantized_states, mask, negatives),
            "gumbel_temperature": float(temperature),
            "mask_fraction": float(masked / mask.numel()),
        }
        return ObjectiveOutput(loss=out.loss / masked, stats=stats)

    def export(self, out_dir: Path, meta: dict) -> None:
        """The upstream ``Wav2Vec2Model`` as an HF directory (+ ``speechbench.json`` with ``meta``)."""
        save_hf_checkpoint(self.model.wav2vec2, out_dir, self.model_options.normalize, extra=meta)


def contrastive_logits(predicted: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, negatives: torch.Tensor
                       ) -> torch.Tensor:
    """Cosine logits ``[N, 1 + K]`` (positive first) of the ``N`` masked frames, before the temperature; negatives
    identical to the positive get ``-inf``. ``predicted``/``targets`` ``[B, T, P]``, ``negatives [B, T, K]`` flat."""
    positive = targets[mask]  # [N, P]
    negative = targets.reshape(-1, targets.shape[-1])[negatives[mask]]  # [N, K, P]
    candidates = torch.cat([positive[:, None], negative], dim=1)  # [N, 1 + K, P]
    logits = torch.cosine_similarity(predicted[mask][:, None].float(), candidates.float(), dim=-1)
    same = (negative == positive[:, None]).all(dim=-1)
    logits[:, 1:] = logits[:, 1:].masked_fill(same, float("-inf"))
    return logits


@torch.no_grad()
def contrastive_accuracy(predicted: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, negatives: torch.Tensor
                         ) -> float:
    """Fraction of masked frames whose context ``predicted [B, T, P]`` is closer (cosine) to its own target in
    ``targets [B, T, P]`` than to any of its distractors (fairseq's ``correct / count``)."""
    return float((contrastive_logits(predicted, targets, mask, negatives).argmax(dim=-1) == 0).float().mean())


@torch.no_grad()
def identical_negatives(targets: torch.Tensor, mask: torch.Tensor, negatives: torch.Tensor) -> float:
    """Fraction of the distractors equal to their positive (same codes): they are left out of the softmax, so a
    collapsing codebook lowers the loss without any prediction."""
    positive = targets[mask]  # [N, P]
    negative = targets.reshape(-1, targets.shape[-1])[negatives[mask]]  # [N, K, P]
    return float((negative == positive[:, None]).all(dim=-1).float().mean())


@register_objective("wav2vec2", Wav2Vec2ModelOptions, Wav2Vec2ObjectiveOptions)
def build(model_options: Wav2Vec2ModelOptions, objective_options: Wav2Vec2ObjectiveOptions,
          seed: int) -> Wav2Vec2Objective:
    """A freshly initialised wav2vec 2.0 objective; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return Wav2Vec2Objective(model_options, objective_options)
