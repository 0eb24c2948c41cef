"""Score formulas for explanations: AUROC, balanced accuracy, F1 and Pearson correlation.

Plain numpy on 1-D arrays; labels are booleans (True = the feature fires).
Degenerate inputs get a defined value instead of NaN: AUROC 0.5 when one class
is empty, correlation 0 when either side is constant, F1 0 when nothing is
predicted or present.
"""

from __future__ import annotations

import numpy as np


def auroc(scores, labels) -> float:
    """Probability that a random positive outscores a random negative (ties count one half).

    Computed from average ranks (the Mann-Whitney U statistic), O(n log n).
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average rank (1-based) over each run of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    average = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(average, ends - starts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def confusion(predicted, labels) -> tuple[int, int, int, int]:
    """(true positives, false positives, true negatives, false negatives)."""
    predicted, labels = np.asarray(predicted, dtype=bool), np.asarray(labels, dtype=bool)
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    tn = int((~predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    return tp, fp, tn, fn


def balanced_accuracy(predicted, labels) -> float:
    """Mean of the true-positive rate and the true-negative rate (a class that is absent is left out)."""
    tp, fp, tn, fn = confusion(predicted, labels)
    rates = [tp / (tp + fn)] if tp + fn else []
    rates += [tn / (tn + fp)] if tn + fp else []
    return float(np.mean(rates)) if rates else 0.0


def f1(predicted, labels) -> float:
    """Harmonic mean of precision and recall of the positive class."""
    tp, fp, _, fn = confusion(predicted, labels)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def pearson(x, y) -> float:
    """Pearson correlation of two equal-length arrays (0 when either is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size == 0:
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0
