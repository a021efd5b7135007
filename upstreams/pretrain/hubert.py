"""HuBERT pretraining (Hsu et al. 2021): masked prediction of k-means cluster ids, in two iterations.

The trained module holds ``transformers``' ``HubertModel`` (conv feature encoder, transformer, ``masked_spec_embed``;
the exported upstream) plus the objective-only parts ``final_proj`` (``Linear(hidden, final_dim)``) and
``label_embeddings [K, final_dim]``. One step, for equal-length crops ``wavs [B, S]``:

1. targets ``long [B, T]``, one per model frame (50 Hz): the nearest k-means centroid (:func:`assign_clusters`) of
   the frame's target features, standardised with the mean/std of the k-means data. Iteration 1: 39-d MFCCs
   (:func:`mfcc_features`); iteration 2: hidden state ``teacher_layer`` of the iteration-1 model ``teacher``
   (frozen, outside this module's state);
2. waveform normalisation when ``normalize`` is on, exactly as the HF loader does at evaluation time;
3. span masks (wav2vec 2.0's :func:`upstreams.pretrain.wav2vec2.span_mask`, fairseq-style: ``mask_time_prob`` of
   the frames as span starts, spans of ``mask_time_length``, at least 2); ``HubertModel`` replaces the masked frames
   by ``masked_spec_embed`` before the transformer;
4. logits ``cos(final_proj(x_t), label_embeddings[c]) / logit_temperature`` over all ``K`` clusters; the loss is
   the cross entropy on masked frames (mean) plus ``unmasked_weight`` times that on unmasked frames (fairseq Base:
   ``pred_masked_weight`` 1, ``pred_nomask_weight`` 0).

``prepare()`` fits the k-means (scikit-learn ``MiniBatchKMeans``, :mod:`upstreams.pretrain.kmeans`) on up to
``kmeans_max_frames`` frames of the crops it is given and stores centroids, mean and std as buffers, so a resumed run
(which skips ``prepare()``) and the exported metadata keep them. Iteration 2 starts from a fresh random
initialisation, as in the paper; only its targets come from the iteration-1 model.

Differences from fairseq worth knowing: the MFCCs are computed on the per-utterance normalised waveform (our crops have
random loudness, and the log energy in c0 would otherwise make loudness a cluster feature), the k-means features are
standardised per dimension (fairseq clusters raw MFCCs, where c0 dominates the distances), no L2 penalty on the conv
features and no ``feature_grad_mult``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from speechbench.upstreams.features import (
    FRAME_LENGTH,
    add_deltas,
    cepstral_lifter,
    dct_matrix,
    frame_waves,
    kaldi_mel_banks,
    kaldi_power_spectrum,
    log_mel_from_power,
    povey_window,
)
from speechbench.upstreams.hf import HF_NORM_EPS, normalize_waveforms, save_hf_checkpoint
from speechbench.upstreams.pretrain.base import Objective, ObjectiveOutput, register_objective
from speechbench.upstreams.pretrain.kmeans import (
    KMeansSettings,
    assign_clusters,
    cluster_usage,
    feature_stats,
    fit_kmeans,
)
from speechbench.upstreams.pretrain.transformer import TransformerOptions, config_kwargs
from speechbench.upstreams.pretrain.wav2vec2 import conv_frames, span_mask

MFCC_DIM = 39  # 13 cepstra + deltas + delta-deltas
DEFAULT_CLUSTERS = {1: 50, 2: 100}  # fairseq Base: 100 and 500, for 960 h; ours are a few hours of synthetic speech


@dataclass(frozen=True)
class HubertModelOptions(TransformerOptions):
    """Architecture (fields of ``HubertConfig``): exactly the shared transformer fields. Base: those of
    :class:`TransformerOptions` (and objective ``final_dim=256``)."""


@dataclass(frozen=True)
class HubertObjectiveOptions:
    """Targets, masking and loss settings (fairseq Base values in comments)."""

    iteration: int = 1  # 1: k-means of MFCCs; 2: k-means of the iteration-1 model's teacher_layer
    teacher: str | None = None  # iteration 2: directory exported by iteration 1 (any build_upstream name works)
    teacher_layer: int | None = None  # hidden state of the teacher (0 = transformer input); default: middle (6 of 12)
    num_clusters: int | None = None  # default 50 (iteration 1) / 100 (iteration 2); fairseq 100 / 500
    kmeans_max_frames: int = 200_000  # frames gathered in prepare() for the k-means fit
    kmeans_standardize: bool = True  # cluster per-dimension standardised features
    kmeans_batch_size: int = 10_000  # MiniBatchKMeans settings (10000)
    kmeans_max_iter: int = 100  # (100)
    kmeans_n_init: int = 5  # (20)
    mask_time_prob: float = 0.8  # fraction of frames drawn as span starts (0.8)
    mask_time_length: int = 10  # span length in frames (10)
    mask_min_spans: int = 2  # (2)
    final_dim: int = 64  # projection compared with the label embeddings (256)
    logit_temperature: float = 0.1  # (0.1)
    unmasked_weight: float = 0.0  # loss weight of unmasked frames (pred_nomask_weight 0; masked weight is 1)


def resolved_num_clusters(options: HubertObjectiveOptions) -> int:
    return options.num_clusters if options.num_clusters is not None else DEFAULT_CLUSTERS.get(options.iteration, 0)


def check_objective_options(options: HubertObjectiveOptions) -> None:
    """One-line errors naming the offending ``objective.*`` option."""
    if options.iteration not in (1, 2):
        raise ValueError(f"hubert objective.iteration must be 1 or 2; got {options.iteration}")
    if options.iteration == 2 and not options.teacher:
        raise ValueError("hubert objective.teacher is required for iteration 2: the directory exported by iteration 1 "
                         "(bench pretrain --model hubert --iteration 2 --from DIR)")
    if options.iteration == 1 and options.teacher:
        raise ValueError(f"hubert objective.teacher applies to iteration 2 only (iteration 1 clusters MFCCs); "
                         f"got teacher={options.teacher!r}")
    if options.iteration == 1 and options.teacher_layer is not None:
        raise ValueError("hubert objective.teacher_layer applies to iteration 2 only")
    if resolved_num_clusters(options) < 2:
        raise ValueError(f"hubert objective.num_clusters must be >= 2; got {options.num_clusters}")
    if options.kmeans_max_frames < resolved_num_clusters(options):
        raise ValueError(f"hubert objective.kmeans_max_frames ({options.kmeans_max_frames}) must be at least "
                         f"num_clusters ({resolved_num_clusters(options)})")
    if not (0.0 <= options.mask_time_prob and options.mask_time_length >= 1 and options.mask_min_spans >= 1):
        raise ValueError("hubert objective needs mask_time_prob >= 0, mask_time_length >= 1, mask_min_spans >= 1")
    if options.final_dim < 1 or options.logit_temperature <= 0 or options.unmasked_weight < 0:
        raise ValueError("hubert objective needs final_dim >= 1, logit_temperature > 0, unmasked_weight >= 0")


def build_config(model: HubertModelOptions):
    """The ``HubertConfig`` of these options (pretraining masks are passed to the forward)."""
    from transformers import HubertConfig

    return HubertConfig(**config_kwargs(model))


@functools.lru_cache(maxsize=1)
def _mfcc_constants() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Povey window, 23 Kaldi mel filters, DCT ``[23, 13]`` and lifter 22 (torchaudio ``kaldi.mfcc`` defaults)."""
    return povey_window(FRAME_LENGTH), kaldi_mel_banks(23), dct_matrix(13, 23), cepstral_lifter(13, 22.0)


def fit_frames(features: torch.Tensor, frames: int) -> torch.Tensor:
    """``[B, T', F] -> [B, frames, F]``: trailing frames dropped, or the last frame repeated (``T' < frames``)."""
    if features.shape[1] >= frames:
        return features[:, :frames]
    pad = features[:, -1:].expand(-1, frames - features.shape[1], -1)
    return torch.cat([features, pad], dim=1)


def mfcc_features(wavs: torch.Tensor, wav_lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """Iteration-1 target features ``[B, frames, 39]`` of equal-length crops ``wavs [B, S]``.

    13 Kaldi MFCCs (23 mel bins, c0 from the DCT as fairseq's ``torchaudio.compliance.kaldi.mfcc``) + deltas +
    delta-deltas at 100 Hz (fairseq's label rate), then every second frame. Frame ``2 t`` (samples
    ``[320 t, 320 t + 400)``) covers exactly the receptive field of model frame ``t`` (kernel 400, stride 320), which
    is what fairseq does with 100 Hz labels; a 20 ms hop would give the same statics but deltas over +-40 ms instead
    of HuBERT's +-20 ms. The count is then fitted to the model's ``frames`` (equal for the standard conv stack; other
    conv stacks trim or repeat the last frame). Computed on the per-utterance normalised waveform: invariant to the
    crops' random loudness.
    """
    window, banks, dct, lifter = (c.to(wavs.device) for c in _mfcc_constants())
    wav_lengths = torch.as_tensor(wav_lengths, device=wavs.device).long()
    wavs = normalize_waveforms(wavs.float(), wav_lengths, HF_NORM_EPS)
    framed, counts = frame_waves(wavs, wav_lengths)  # [B, T100, 400]
    power, _ = kaldi_power_spectrum(framed, window)
    cepstra = torch.matmul(log_mel_from_power(power, banks), dct) * lifter  # [B, T100, 13]
    return fit_frames(add_deltas(cepstra, counts)[:, ::2], frames)


class HubertObjective(Objective):
    """Masked prediction of k-means cluster ids (see the module docstring)."""

    family = "hubert"

    def __init__(self, model: HubertModelOptions, objective: HubertObjectiveOptions, seed: int = 0) -> None:
        super().__init__()
        from transformers import HubertModel

        check_objective_options(objective)
        self.model_options, self.objective_options, self.seed = model, objective, seed
        self.num_clusters = resolved_num_clusters(objective)
        self.model = HubertModel(build_config(model))
        self.final_proj = nn.Linear(model.hidden_size, objective.final_dim)
        # normal rather than fairseq's uniform [0, 1): cosine logits start spread instead of all near 0.75
        self.label_embeddings = nn.Parameter(torch.randn(self.num_clusters, objective.final_dim))
        # The teacher is loaded after the trained parameters (it must not shift their seeded initialisation) and kept
        # out of the module tree: not in state_dict (a resume rebuilds it from its path), not switched to train mode.
        self._teacher: tuple[nn.Module, ...] = ()
        self.teacher_layer: int | None = None
        dim = MFCC_DIM
        if objective.iteration == 2:
            teacher, self.teacher_layer = load_teacher(objective.teacher, objective.teacher_layer,
                                                       math.prod(model.conv_stride))
            self._teacher = (teacher,)
            dim = int(teacher.hidden_size)
        self.register_buffer("centroids", torch.zeros(self.num_clusters, dim))  # in standardised units
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        self.register_buffer("kmeans_frames", torch.zeros((), dtype=torch.long))  # 0 until prepare() has run
        # which teacher weights the centroids were fitted on: a resumed run (state_dict loaded) must use the same
        self._teacher_fingerprint = teacher_fingerprint(self.teacher)
        self.register_buffer("teacher_fingerprint", torch.tensor(self._teacher_fingerprint, dtype=torch.long))

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def num_frames(self, num_samples: int) -> int:
        return conv_frames(num_samples, self.model_options.conv_kernel, self.model_options.conv_stride)

    def target_features(self, wavs: torch.Tensor, wav_lengths: torch.Tensor, frames: int) -> torch.Tensor:
        """Unstandardised features ``[B, frames, F]`` whose clusters are the targets (no gradient)."""
        if self.teacher is None:
            with torch.no_grad():
                return mfcc_features(wavs, wav_lengths, frames)
        teacher = self.teacher.to(wavs.device)
        with torch.inference_mode():
            hidden = teacher(wavs, wav_lengths).hidden[:, self.teacher_layer]  # [B, T, D]
        return fit_frames(hidden, frames).clone()  # clone: a normal tensor, usable outside inference mode

    def targets(self, wavs: torch.Tensor, wav_lengths: torch.Tensor, frames: int) -> torch.Tensor:
        """Cluster ids ``long [B, frames]``: nearest centroid of each frame's standardised target features."""
        if int(self.kmeans_frames) == 0:
            raise RuntimeError("hubert: the k-means targets are not fitted; call prepare() before training")
        if int(self.teacher_fingerprint) != self._teacher_fingerprint:
            raise RuntimeError(f"hubert: objective.teacher {self.objective_options.teacher!r} holds other weights than "
                               f"the teacher the k-means centroids were fitted on (it changed since prepare())")
        with torch.no_grad():
            feats = (self.target_features(wavs, wav_lengths, frames) - self.feature_mean) / self.feature_std
            return assign_clusters(feats, self.centroids)

    def sample_mask(self, batch: int, frames: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Span mask ``bool [B, T]`` of the objective's settings (torch RNG unless ``generator``)."""
        o = self.objective_options
        return span_mask(batch, frames, o.mask_time_prob, min(o.mask_time_length, frames), o.mask_min_spans,
                         generator)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., D] -> [..., K]``: cosine(final_proj(hidden), label embeddings) / logit_temperature."""
        projected = nn.functional.normalize(self.final_proj(hidden), dim=-1)
        embeddings = nn.functional.normalize(self.label_embeddings, dim=-1)
        return projected @ embeddings.T / self.objective_options.logit_temperature

    def prepare(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], log: Callable[[str], None]) -> None:
        """Fit the k-means on up to ``kmeans_max_frames`` target-feature frames of ``batches``."""
        o, start = self.objective_options, time.perf_counter()
        gathered, count = [], 0
        for wavs, wav_lengths in batches:
            feats = self.target_features(wavs.float(), wav_lengths, self.num_frames(wavs.shape[1]))
            gathered.append(feats.reshape(-1, feats.shape[-1]).cpu())
            count += gathered[-1].shape[0]
            if count >= o.kmeans_max_frames:
                break  # stop drawing crops: each one costs audio loading (and a teacher forward)
        if not gathered:
            raise ValueError("hubert prepare(): no batches to fit the k-means on")
        feats = torch.cat(gathered)[: o.kmeans_max_frames]
        mean, std = feature_stats(feats) if o.kmeans_standardize else (torch.zeros(feats.shape[1]),
                                                                         torch.ones(feats.shape[1]))
        settings = KMeansSettings(o.kmeans_batch_size, o.kmeans_max_iter, o.kmeans_n_init)
        centroids = fit_kmeans((feats - mean) / std, self.num_clusters, self.seed, settings)
        self.centroids.copy_(centroids)
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)
        self.kmeans_frames.fill_(feats.shape[0])
        used, perplexity = cluster_usage(assign_clusters((feats - mean) / std, centroids), self.num_clusters)
        log(f"hubert iteration {o.iteration}: k-means of {self.target_name()} on {feats.shape[0]} frames: "
            f"{used}/{self.num_clusters} clusters used, usage perplexity {perplexity:.1f} "
            f"({time.perf_counter() - start:.1f} s)")

    def target_name(self) -> str:
        return "MFCC (39-d)" if self.teacher is None else f"teacher layer {self.teacher_layer}"

    def forward(self, wavs: torch.Tensor, wav_lengths: torch.Tensor) -> ObjectiveOutput:
        """``wavs [B, S]`` equal-length crops (``wav_lengths [B]`` all ``S``) -> cross entropy per masked frame."""
        wav_lengths = torch.as_tensor(wav_lengths, device=wavs.device).long()
        if wavs.dim() != 2 or bool((wav_lengths != wavs.shape[1]).any()):
            raise ValueError("hubert pretraining takes equal-length crops: wavs [B, S] with every length S")
        wavs = wavs.float()
        frames = self.num_frames(wavs.shape[1])
        targets = self.targets(wavs, wav_lengths, frames)  # [B, T]
        if self.model_options.normalize:
            wavs = normalize_waveforms(wavs, wav_lengths, HF_NORM_EPS)
        mask = self.sample_mask(wavs.shape[0], frames).to(wavs.device)
        hidden = self.model(wavs, mask_time_indices=mask).last_hidden_state  # [B, T, D]
        logits = self.logits(hidden)  # [B, T, K]
        masked_loss = nn.functional.cross_entropy(logits[mask], targets[mask])
        loss = masked_loss
        unmasked = ~mask
        if self.objective_options.unmasked_weight > 0 and bool(unmasked.any()):
            loss = loss + self.objective_options.unmasked_weight * nn.functional.cross_entropy(logits[unmasked],
                                                                                               targets[unmasked])
        with torch.no_grad():
            correct = logits.argmax(dim=-1) == targets
            stats = {
                "masked_loss": float(masked_loss.detach()),
                "masked_accuracy": float(correct[mask].float().mean()),
                "unmasked_accuracy": float(correct[unmasked].float().mean()) if bool(unmasked.any()) else 0.0,
                "mask_fraction": float(mask.float().mean()),
            }
        return ObjectiveOutput(loss=loss, stats=stats)

    def clustering_meta(self) -> dict:
        o = self.objective_options
        teacher = self.teacher
        return {"iteration": o.iteration, "targets": self.target_name(), "teacher": o.teacher,
                "teacher_layer": self.teacher_layer,
                "teacher_sha256": getattr(teacher, "checkpoint_sha256", None) if teacher is not None else None,
                "num_clusters": self.num_clusters, "kmeans_frames": int(self.kmeans_frames),
                "kmeans_max_frames": o.kmeans_max_frames, "kmeans_standardize": o.kmeans_standardize,
                "kmeans_seed": self.seed, "kmeans_batch_size": o.kmeans_batch_size,
                "kmeans_max_iter": o.kmeans_max_iter, "kmeans_n_init": o.kmeans_n_init}

    def export(self, out_dir: Path, meta: dict) -> None:
        """The upstream ``HubertModel`` as an HF directory (+ ``speechbench.json``: ``meta`` and ``hubert``, the
        iteration, teacher and clustering settings)."""
        save_hf_checkpoint(self.model, out_dir, self.model_options.normalize,
                           extra={**meta, "hubert": self.clustering_meta()})


def teacher_fingerprint(teacher: nn.Module | None) -> int:
    """The first 60 bits of the teacher's weight-file sha256 (0 without a teacher or a known hash)."""
    sha = getattr(teacher, "checkpoint_sha256", None) if teacher is not None else None
    return int(sha[:15], 16) if sha else 0


def load_teacher(teacher: str, layer: int | None, downsample_rate: int) -> tuple[nn.Module, int]:
    """The frozen iteration-1 upstream and the validated hidden-state index (default: the middle one)."""
    from speechbench.upstreams.registry import build_upstream

    upstream = build_upstream(teacher)
    num_layers = int(upstream.num_layers)
    if layer is None:
        layer = num_layers // 2  # of hidden states 0..L-1: transformer layer 6 of 12 (fairseq Base), 2 of 3
    if not 0 <= layer < num_layers:
        raise ValueError(f"hubert objective.teacher_layer must be in [0, {num_layers - 1}] for teacher {teacher!r} "
                         f"({num_layers} hidden states); got {layer}")
    if int(upstream.downsample_rate) != downsample_rate:
        raise ValueError(f"hubert objective.teacher {teacher!r} has {upstream.downsample_rate} samples per frame; the "
                         f"model being trained has {downsample_rate}")
    upstream.eval().requires_grad_(False)
    return upstream, layer


@register_objective("hubert", HubertModelOptions, HubertObjectiveOptions)
def build(model_options: HubertModelOptions, objective_options: HubertObjectiveOptions, seed: int) -> HubertObjective:
    """A freshly initialised HuBERT objective; the same seed gives the same weights (and the same k-means)."""
    check_objective_options(objective_options)  # before the (slow) model construction
    torch.manual_seed(seed)
    return HubertObjective(model_options, objective_options, seed)
