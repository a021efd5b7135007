"""k-means for HuBERT targets: fit with scikit-learn's ``MiniBatchKMeans``, assign in torch.

Fitting happens once (HuBERT's ``prepare()``) on at most a few hundred thousand frames; assignment happens on every
training batch, so it is a pure torch function (exact Euclidean distances, no Python loop over frames) that runs on
whatever device the features live on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STD_FLOOR = 1e-5  # a constant feature dimension must not blow up the standardisation


@dataclass(frozen=True)
class KMeansSettings:
    """``MiniBatchKMeans`` settings; fairseq's HuBERT ``learn_kmeans.py`` values in comments."""

    batch_size: int = 10_000  # (10000)
    max_iter: int = 100  # passes over the data (100)
    n_init: int = 5  # k-means++ initialisations, the best kept (20)
    max_no_improvement: int = 100  # early stop after this many mini-batches without improvement (100)


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean ``[F]`` and population standard deviation ``[F]`` (floored) of ``features [N, F]``."""
    features = features.double()  # a few hundred thousand frames: sum in float64
    mean = features.mean(dim=0)
    std = features.std(dim=0, correction=0).clamp_min(STD_FLOOR)
    return mean.float(), std.float()


def fit_kmeans(features: torch.Tensor, num_clusters: int, seed: int,
               settings: KMeansSettings = KMeansSettings()) -> torch.Tensor:
    """Centroids ``[K, F]`` (float32) of ``features [N, F]`` by ``MiniBatchKMeans`` with k-means++ initialisation.

    The same features, ``K`` and ``seed`` give the same centroids (``random_state=seed``). ``reassignment_ratio=0``
    as in fairseq: small clusters are not re-seeded mid-fit, which keeps the fit stable on a small corpus.
    """
    from sklearn.cluster import MiniBatchKMeans

    if features.dim() != 2:
        raise ValueError(f"k-means takes features [N, F]; got shape {tuple(features.shape)}")
    if features.shape[0] < num_clusters:
        raise ValueError(f"k-means needs at least num_clusters={num_clusters} frames; got {features.shape[0]}")
    kmeans = MiniBatchKMeans(n_clusters=num_clusters, init="k-means++", random_state=seed,
                             batch_size=settings.batch_size, max_iter=settings.max_iter, n_init=settings.n_init,
                             max_no_improvement=settings.max_no_improvement, tol=0.0, reassignment_ratio=0.0,
                             compute_labels=False)
    kmeans.fit(features.detach().cpu().double().numpy())
    return torch.from_numpy(kmeans.cluster_centers_).float()


def assign_clusters(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (Euclidean) per frame: ``features [B, T, F]``, ``centroids [K, F]`` ->
    ``long [B, T]``. Ties go to the lowest index (``argmin``)."""
    if features.shape[-1] != centroids.shape[-1]:
        raise ValueError(f"features have {features.shape[-1]} dimensions, centroids {centroids.shape[-1]}")
    flat = features.reshape(-1, features.shape[-1]).to(centroids.dtype)
    # exact differences rather than the |x|^2 - 2 x.c + |c|^2 expansion, which can misorder near ties
    distances = torch.cdist(flat, centroids, compute_mode="donot_use_mm_for_euclid_dist")  # [B * T, K]
    return distances.argmin(dim=1).reshape(features.shape[:-1])


def cluster_usage(assignments: torch.Tensor, num_clusters: int) -> tuple[int, float]:
    """How many clusters ``assignments`` (long, any shape) use, and the perplexity of their frequencies
    (``num_clusters`` when every cluster is equally frequent, 1 when one cluster takes every frame)."""
    counts = torch.bincount(assignments.flatten(), minlength=num_clusters).double()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return int((counts > 0).sum()), float(entropy.exp())
