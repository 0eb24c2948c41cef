"""Score formulas against values computed by hand."""

import numpy as np
import pytest

from pipeline.explain.metrics import auroc, balanced_accuracy, confusion, f1, pearson


def test_auroc_by_hand_with_ties():
    # Positives 0.9, 0.5, 0.3; negatives 0.5, 0.1. Pairs: (0.9>0.5, 0.9>0.1, 0.5=0.5 -> 1/2, 0.5>0.1, 0.3<0.5, 0.3>0.1)
    # = 1 + 1 + 0.5 + 1 + 0 + 1 = 4.5 of 6.
    scores = [0.9, 0.5, 0.3, 0.5, 0.1]
    labels = [True, True, True, False, False]
    assert auroc(scores, labels) == pytest.approx(4.5 / 6)


def test_auroc_extremes_and_degenerate():
    assert auroc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert auroc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert auroc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5
    assert auroc([1, 2], [1, 1]) == 0.5  # one class missing


def test_auroc_matches_brute_force_pairs():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auroc(scores, labels) == pytest.approx(brute)


def test_confusion_balanced_accuracy_f1_by_hand():
    predicted = [1, 1, 0, 0, 1, 0]
    labels = [1, 0, 0, 1, 1, 0]
    assert confusion(predicted, labels) == (2, 1, 2, 1)
    assert balanced_accuracy(predicted, labels) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert f1(predicted, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert f1([0, 0], [1, 0]) == 0.0
    assert balanced_accuracy([1, 1, 1], [1, 1, 0]) == pytest.approx(0.5)


def test_pearson_by_hand():
    # x = 1,2,3 ; y = 2,4,7: centred x = -1,0,1 ; y mean 13/3 -> -7/3,-1/3,8/3 ; cov = 15/3 = 5
    # |x| = sqrt 2, |y| = sqrt(49/9 + 1/9 + 64/9) = sqrt(114)/3
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / (np.sqrt(2) * np.sqrt(114) / 3))
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0
    assert pearson([], []) == 0.0
