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
