"""Statistics over per-item test outcomes: bootstrap intervals, paired tests, and Holm's correction.

Pure functions on numpy arrays (no files, no torch). A run's test outcomes are an :class:`ItemScores`: one entry per
test item, of one of three kinds, told apart by the keys of the run's ``items.jsonl`` (``downstreams/tasks.py``):

- ``accuracy``: ``correct`` (0/1) per utterance; the metric is 100 * mean.
- ``error_rate``: ``edits`` and ``ref_len`` per utterance; the metric is corpus level, 100 * sum(edits) /
  sum(ref_len) (WER, PER), never a mean of per-utterance rates.
- ``eer``: ``label`` (1 target, 0 nontarget), ``score``, ``enroll_speaker`` and ``test_speaker`` per trial; the
  metric is the EER of the ROC curve (scikit-learn ``roc_curve``).

**Bootstrap.** A resample draws the resampling units (clusters) with replacement, as many as there are, and gives
every item the number of times its cluster was drawn as its weight; the corpus-level metric is recomputed on the
weighted items (:meth:`ItemScores.metric`). The units are the utterances themselves, except for verification, where
trials that share a speaker are not independent, so the unit is a speaker (see :func:`trial_clusters`). Tasks with
folds (ER) resample within each fold and average the fold metrics, as the leaderboard does; runs of several seeds
share each fold's draws and are averaged exactly like the point estimate (see :func:`cell_value`).
Intervals are percentile intervals of the resampled values; the draws come from ``numpy.random.default_rng(seed)``
so that every number is reproducible.

**Paired comparison** of two upstreams on the same test items applies the same draws to both and looks at the
resampled differences: their percentile interval, and a two-sided p-value that is the smallest level at which the
percentile interval excludes zero, ``2 * min(P(d <= 0), P(d >= 0))`` with the add-one rule ``(k + 1) / (B + 1)`` (so
it is never 0 and the verdict agrees with the interval). Accuracy tasks also get McNemar's exact test on the
discordant items (:func:`mcnemar_exact`). :func:`holm` corrects a family of p-values for the number of tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
KINDS = ("accuracy", "error_rate", "eer")
_KEYS = {"accuracy": ("correct",), "error_rate": ("edits", "ref_len"),
         "eer": ("label", "score", "enroll_speaker", "test_speaker")}
_BLOCK_CELLS = 4_000_000  # weights computed per block of resamples: about 32 MB of float64 at a time


MIN_VALID_SHARE = 0.75  # resamples with an undefined metric (no target or no nontarget trial) are dropped up to this


class ItemScoresError(ValueError):
    """Per-item records that do not form one of the three kinds (the message says what is wrong)."""


class BootstrapError(ValueError):
    """Too few resamples have a defined metric (e.g. an EER needs target and nontarget trials in the resample)."""


# ---------------------------------------------------------------------------------------------- metrics


def accuracy_percent(correct: np.ndarray, weights: np.ndarray | None = None) -> float:
    """100 * weighted mean of 0/1 outcomes."""
    return 100.0 * float(np.average(correct, weights=weights))


def error_rate_percent(edits: np.ndarray, ref_len: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Corpus-level error rate in %: 100 * sum(w * edits) / sum(w * ref_len)."""
    w = np.ones_like(edits, dtype=float) if weights is None else weights
    return 100.0 * float(np.dot(w, edits) / np.dot(w, ref_len))


def equal_error_rate_percent(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """EER in % from the (weighted) ROC curve of scikit-learn, interpolated linearly where the false-reject rate
    crosses the false-accept rate (the definition of ``downstreams.metrics.equal_error_rate_percent``, with weights:
    a trial drawn k times by a resample counts k times). NaN when the weighted trials lack targets or nontargets."""
    from sklearn.metrics import roc_curve

    if weights is not None:
        keep = weights > 0
        labels, scores, weights = labels[keep], scores[keep], weights[keep]
    if labels.min(initial=1) != 0 or labels.max(initial=0) != 1:
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, scores, sample_weight=weights, drop_intermediate=False)
    diff = (1.0 - tpr) - fpr  # from 1 (accept nothing) down to -1 (accept everything)
    i = int((diff <= 0).argmax())
    if diff[i] == 0:
        return 100.0 * float(fpr[i])
    t = diff[i - 1] / (diff[i - 1] - diff[i])
    return 100.0 * float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


# ---------------------------------------------------------------------------------------------- per-item scores


@dataclass(frozen=True)
class ItemScores:
    """The per-item test outcomes of one run. ``ids [N]`` item ids; ``values``: the kind's arrays, each ``[N]``;
    ``clusters [N]``: the resampling unit of each item, as integers ``0 .. n_clusters - 1`` numbered in the sorted
    order of the units' names (item ids, or speakers), so the same item has the same unit number in every run that
    scored it, whatever the order of its file."""

    kind: str
    ids: np.ndarray
    values: Mapping[str, np.ndarray]
    clusters: np.ndarray
    n_clusters: int

    def __len__(self) -> int:
        return len(self.ids)

    def metric(self, weights: np.ndarray | None = None) -> float:
        """The corpus-level metric (%), on the items weighted by ``weights [N]`` (None: every item once)."""
        v = self.values
        if self.kind == "accuracy":
            return accuracy_percent(v["correct"], weights)
        if self.kind == "error_rate":
            return error_rate_percent(v["edits"], v["ref_len"], weights)
        return equal_error_rate_percent(v["label"], v["score"], weights)

    def metric_resampled(self, counts: np.ndarray) -> np.ndarray:
        """The metric for each row of cluster draw counts ``counts [B, n_clusters]`` -> ``[B]``."""
        out = np.empty(len(counts))
        block = max(1, _BLOCK_CELLS // max(1, len(self)))
        for start in range(0, len(counts), block):
            w = counts[start:start + block][:, self.clusters].astype(float)  # [b, N] item weights
            if self.kind == "accuracy":
                out[start:start + block] = 100.0 * (w @ self.values["correct"]) / w.sum(axis=1)
            elif self.kind == "error_rate":
                out[start:start + block] = 100.0 * (w @ self.values["edits"]) / (w @ self.values["ref_len"])
            else:
                out[start:start + block] = [self.metric(row) for row in w]
        return out

    def aligned_to(self, ids: np.ndarray) -> ItemScores:
        """The same items in the order of ``ids`` (the same set; check with :func:`same_items` first)."""
        position = {item: i for i, item in enumerate(self.ids)}
        order = np.array([position[i] for i in ids], dtype=np.int64)
        return ItemScores(self.kind, self.ids[order], {k: v[order] for k, v in self.values.items()},
                          self.clusters[order], self.n_clusters)


def trial_clusters(enroll_speaker: Sequence[str], test_speaker: Sequence[str]) -> tuple[np.ndarray, int]:
    """The resampling unit of each verification trial: its enrolment speaker.

    A resample draws speakers with replacement and takes every trial whose enrolment speaker was drawn, once per
    draw. Each trial belongs to exactly one unit, so a resample keeps the expected number of trials and the target /
    nontarget mix of the list, and all trials that share an enrolment speaker (its target trials, and the
    nontarget trials it enrols) move together, which is the dependence that dominates a trial list built per
    speaker. The alternative, drawing both speakers of a trial (weight = product of the two draw counts), also
    captures sharing through the test side but is known to be conservative (Owen 2007, the "pigeonhole"
    bootstrap), weights target trials by the square of their speaker's count, and leaves the trial count very
    uneven across resamples; both speakers are kept in ``items.jsonl``, so that variant can be computed from the
    same files. ``test_speaker`` is accepted to keep the signature of that variant."""
    del test_speaker
    speakers, clusters = np.unique(np.asarray(enroll_speaker, dtype=str), return_inverse=True)
    return clusters.astype(np.int64), len(speakers)


def item_scores(records: Sequence[Mapping], where: str = "items") -> ItemScores:
    """Build :class:`ItemScores` from the records of an ``items.jsonl`` (``where`` names it in errors)."""
    if not records:
        raise ItemScoresError(f"{where}: no items")
    keys = set(records[0])
    kind = next((k for k, needed in _KEYS.items() if set(needed) <= keys), None)
    if kind is None or "id" not in keys:
        raise ItemScoresError(f"{where}: items need 'id' and one of {', '.join('+'.join(v) for v in _KEYS.values())};"
                              f" found keys {sorted(keys)}")
    try:
        ids = np.array([str(r["id"]) for r in records])
        columns = {k: [r[k] for r in records] for k in _KEYS[kind]}
    except KeyError as e:
        raise ItemScoresError(f"{where}: an item lacks {e}") from None
    if len(set(ids.tolist())) != len(ids):
        raise ItemScoresError(f"{where}: item ids are not unique")
    if kind == "eer":
        values = {"label": np.asarray(columns["label"], dtype=int), "score": np.asarray(columns["score"], dtype=float)}
        if set(np.unique(values["label"])) != {0, 1}:
            raise ItemScoresError(f"{where}: trials need both target (1) and nontarget (0) labels, and nothing else")
        clusters, n = trial_clusters(columns["enroll_speaker"], columns["test_speaker"])
    else:
        values = {k: np.asarray(v, dtype=float) for k, v in columns.items()}
        clusters, n = np.unique(ids, return_inverse=True)[1].astype(np.int64), len(ids)
        if kind == "accuracy" and not np.isin(values["correct"], (0, 1)).all():
            raise ItemScoresError(f"{where}: 'correct' must be 0 or 1")
        if kind == "error_rate" and values["ref_len"].sum() <= 0:
            raise ItemScoresError(f"{where}: the references have no tokens")
    if not all(np.isfinite(v).all() for v in values.values()):
        raise ItemScoresError(f"{where}: non-finite values")
    items = ItemScores(kind, ids, values, clusters, n)
    # trials in score order: the ROC's sort then meets sorted input on every resample (about a third faster)
    return items.aligned_to(ids[np.argsort(values["score"], kind="stable")]) if kind == "eer" else items


def same_items(a: ItemScores, b: ItemScores) -> str | None:
    """None when two runs scored the same test items (same ids, same kind); else why not, in a few words."""
    if a.kind != b.kind:
        return f"different metrics ({a.kind} vs {b.kind})"
    ids_a, ids_b = set(a.ids.tolist()), set(b.ids.tolist())
    if ids_a == ids_b:
        return None
    only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
    example = f"e.g. {only_a[0]!r} only in the first" if only_a else f"e.g. {only_b[0]!r} only in the second"
    return f"{len(ids_a)} vs {len(ids_b)} test items, {len(only_a)} + {len(only_b)} not shared ({example})"


# ---------------------------------------------------------------------------------------------- cells

# A cell is what the leaderboard averages into one number: the runs of one (upstream, task) keyed by (fold, seed).
Cell = Mapping[tuple, ItemScores]


def cell_value(values: Mapping[tuple, float | np.ndarray]) -> float | np.ndarray:
    """The leaderboard's mean: per seed the mean over its folds, then the mean over seeds (``leaderboard/tables.py``
    rules 4 and 5). ``values`` maps ``(fold, seed)`` to a number or to an array of resampled numbers."""
    by_seed: dict = {}
    for (_, seed), v in values.items():
        by_seed.setdefault(seed, []).append(v)
    return np.mean([np.mean(vs, axis=0) for vs in by_seed.values()], axis=0)


def draw_counts(cells: Sequence[Cell], resamples: int, seed: int) -> dict:
    """One set of cluster draws per fold, ``{fold: counts [resamples, n_clusters]}``, shared by all ``cells`` (their
    runs of a fold must score the same items, aligned to one order). Folds are drawn in sorted order from one
    ``default_rng(seed)``, so the draws depend only on the seed and the folds' sizes."""
    rng = np.random.default_rng(seed)
    folds = sorted({fold for cell in cells for fold, _ in cell}, key=lambda f: (f is not None, f))
    counts = {}
    for fold in folds:
        n = next(items.n_clusters for cell in cells for (f, _), items in cell.items() if f == fold)
        draws = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]  # n draws per resample
        counts[fold] = np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n)
    return counts


def resampled_values(cell: Cell, counts: Mapping) -> np.ndarray:
    """The cell's metric under every resample ``[B]``: each run's metric on its fold's draws, then
    :func:`cell_value`."""
    return cell_value({key: items.metric_resampled(counts[key[0]]) for key, items in cell.items()})


def point_value(cell: Cell) -> float:
    """The cell's metric on the original items (what the leaderboard shows, recomputed from the items)."""
    return float(cell_value({key: items.metric() for key, items in cell.items()}))


def valid_samples(samples: np.ndarray) -> np.ndarray:
    """The resamples whose metric is defined. A resample can leave out every target (or nontarget) trial when few
    speakers hold them; such resamples are dropped (the bootstrap then conditions on a defined metric), but if more
    than ``1 - MIN_VALID_SHARE`` of them are undefined the test set is too small to resample
    (:class:`BootstrapError`)."""
    valid = samples[np.isfinite(samples)]
    if len(valid) < MIN_VALID_SHARE * len(samples):
        raise BootstrapError(f"only {len(valid)} of {len(samples)} resamples have a defined metric (an EER needs "
                             f"target and nontarget trials): too few speakers or items to resample")
    return valid


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of bootstrap samples (undefined ones dropped)."""
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(valid_samples(samples), [tail, 100.0 - tail])
    return float(lo), float(hi)


def bootstrap_interval(cell: Cell, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of one cell's metric."""
    return percentile_interval(resampled_values(cell, draw_counts([cell], resamples, seed)), confidence)


@dataclass(frozen=True)
class PairedResult:
    """A paired comparison of two cells on the same items: ``difference`` = a - b (in the metric's unit), its
    percentile interval, the bootstrap p-value, and McNemar's exact test where both are accuracy with one seed
    (``mcnemar_p``; ``discordant`` = (a right and b wrong, a wrong and b right), summed over folds)."""

    value_a: float
    value_b: float
    difference: float
    interval: tuple[float, float]
    p_bootstrap: float
    mcnemar_p: float | None = None
    discordant: tuple[int, int] | None = None


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p-value of "no difference" from resampled differences: ``2 * min(k<=0, k>=0)``, add-one rule."""
    differences = valid_samples(differences)
    n = len(differences)
    k = min(int((differences <= 0).sum()), int((differences >= 0).sum()))
    return min(1.0, 2.0 * (k + 1) / (n + 1))


def paired_bootstrap(a: Cell, b: Cell, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                     confidence: float = CONFIDENCE) -> PairedResult:
    """Compare two cells whose runs of each fold scored the same items (``b`` aligned to ``a``'s order)."""
    counts = draw_counts([a, b], resamples, seed)
    diffs = resampled_values(a, counts) - resampled_values(b, counts)
    value_a, value_b = point_value(a), point_value(b)
    result = PairedResult(value_a, value_b, value_a - value_b, percentile_interval(diffs, confidence),
                          bootstrap_p_value(diffs))
    one_seed = all(len({s for _, s in cell}) == 1 for cell in (a, b))
    if not one_seed or any(items.kind != "accuracy" for cell in (a, b) for items in cell.values()):
        return result
    folds = sorted({f for f, _ in a}, key=str)
    right_a = np.concatenate([items.values["correct"] for f in folds for (g, _), items in a.items() if g == f])
    right_b = np.concatenate([items.values["correct"] for f in folds for (g, _), items in b.items() if g == f])
    n_ab, n_ba, p = mcnemar_exact(right_a, right_b)
    return dataclasses.replace(result, mcnemar_p=p, discordant=(n_ab, n_ba))


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact test on paired 0/1 outcomes -> (n_ab, n_ba, p): n_ab items only ``a`` got right, n_ba items
    only ``b`` got right; p is the two-sided binomial test of n_ab out of n_ab + n_ba at 1/2 (1 with no discordant
    items)."""
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a).astype(bool), np.asarray(correct_b).astype(bool)
    n_ab, n_ba = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if n_ab + n_ba == 0 else float(binomtest(n_ab, n_ab + n_ba, 0.5).pvalue)
    return n_ab, n_ba, p


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): sort ascending, multiply the i-th smallest (from 0)
    by ``m - i``, make the sequence non-decreasing, cap at 1. Reject at level alpha where adjusted <= alpha."""
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()
