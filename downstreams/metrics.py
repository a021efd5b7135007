"""Metrics as pure functions (percentages, as SUPERB reports them)."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import accuracy_score


def accuracy_percent(predictions: Sequence, references: Sequence) -> float:
    """Utterance-level accuracy in %."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("accuracy of an empty set is undefined")
    return 100.0 * float(accuracy_score(list(references), list(predictions)))


def majority_class_rate_percent(train_labels: Sequence, test_labels: Sequence) -> float:
    """Accuracy of always predicting the most frequent training label, in %."""
    from collections import Counter

    majority = Counter(train_labels).most_common(1)[0][0]
    return accuracy_percent([majority] * len(test_labels), test_labels)


def all_fields_accuracy_percent(predictions: Sequence[Sequence], references: Sequence[Sequence]) -> float:
    """Utterance-level accuracy in % over structured labels (e.g. IC's action, object, location): an utterance
    counts as right only when every field is right."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("accuracy of an empty set is undefined")
    return 100.0 * sum(tuple(p) == tuple(r) for p, r in zip(predictions, references, strict=True)) / len(references)


def field_accuracy_percent(predictions: Sequence[Sequence], references: Sequence[Sequence], index: int) -> float:
    """Utterance-level accuracy in % of one field (``index``) of structured labels."""
    return accuracy_percent([p[index] for p in predictions], [r[index] for r in references])


def mean_over_folds(values_by_fold: dict) -> float:
    """The cross-validation number (ER: mean of the 5 leave-one-session-out test accuracies)."""
    if not values_by_fold:
        raise ValueError("mean over no folds is undefined")
    return float(sum(values_by_fold.values()) / len(values_by_fold))


def word_error_rate_percent(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level WER in %: total word edits (substitutions + deletions + insertions) over total reference words,
    via jiwer. An empty hypothesis costs one deletion per reference word (100 % for an all-empty output)."""
    import jiwer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    if not any(r.split() for r in references):
        raise ValueError("WER of references without words is undefined")
    pairs = [(r, h) for r, h in zip(references, hypotheses, strict=True) if r.split()]
    if len(pairs) < len(references):
        raise ValueError(f"{len(references) - len(pairs)} reference(s) have no words; WER would ignore them")
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    words = sum(len(r.split()) for r, _ in pairs)
    return 100.0 * (out.substitutions + out.deletions + out.insertions) / words


def token_error_rate_percent(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> float:
    """Corpus-level token error rate in % (PER for phone sequences): total Levenshtein edits over total reference
    tokens, via editdistance. Each item is a token sequence (e.g. a list of phones)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    total = sum(len(r) for r in references)
    if total == 0:
        raise ValueError("error rate over references without tokens is undefined")
    edits = sum(edit_count(h, r) for h, r in zip(hypotheses, references, strict=True))
    return 100.0 * edits / total


def edit_count(hypothesis: Sequence[str], reference: Sequence[str]) -> int:
    """Levenshtein distance (substitutions + deletions + insertions) between two token sequences, via
    editdistance; the per-utterance term of a corpus-level WER or PER."""
    import editdistance

    return int(editdistance.eval(list(hypothesis), list(reference)))


def _check_trials(labels: Sequence[int], scores: Sequence[float]):
    import numpy as np

    labels, scores = np.asarray(labels, dtype=int), np.asarray(scores, dtype=float)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be matching 1-d arrays")
    if not set(np.unique(labels)) <= {0, 1} or labels.min(initial=1) != 0 or labels.max(initial=0) != 1:
        raise ValueError("verification needs both target (1) and nontarget (0) trials, and nothing else")
    if not np.isfinite(scores).all():
        raise ValueError("verification scores contain NaN or infinite values")
    return labels, scores


def equal_error_rate_percent(labels: Sequence[int], scores: Sequence[float]) -> float:
    """EER in %: the point of the ROC curve (sklearn ``roc_curve``) where the false-accept rate equals the
    false-reject rate (1 - TPR), linearly interpolated between the two ROC points that bracket it.

    ``labels``: 1 target, 0 nontarget; ``scores``: higher means more likely the same speaker.
    """
    from sklearn.metrics import roc_curve

    labels, scores = _check_trials(labels, scores)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    fnr = 1.0 - tpr
    diff = fnr - fpr  # starts at 1 (threshold +inf), ends at -1 (lowest threshold); non-increasing
    i = int((diff <= 0).argmax())  # first ROC point with FRR <= FAR (i >= 1: diff[0] = 1)
    if diff[i] == 0:
        return 100.0 * float(fpr[i])
    t = diff[i - 1] / (diff[i - 1] - diff[i])
    return 100.0 * float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def min_dcf(labels: Sequence[int], scores: Sequence[float], p_target: float = 0.01, c_miss: float = 1.0,
            c_fa: float = 1.0) -> float:
    """Minimum normalised detection cost over all thresholds (NIST SRE / VoxSRC definition):
    ``min_t (c_miss * P_miss(t) * p_target + c_fa * P_fa(t) * (1 - p_target)) / min(c_miss * p_target,
    c_fa * (1 - p_target))``, thresholds at every ROC point (accept-nothing and accept-all included)."""
    from sklearn.metrics import roc_curve

    labels, scores = _check_trials(labels, scores)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    cost = c_miss * (1.0 - tpr) * p_target + c_fa * fpr * (1.0 - p_target)
    return float(cost.min() / min(c_miss * p_target, c_fa * (1.0 - p_target)))
