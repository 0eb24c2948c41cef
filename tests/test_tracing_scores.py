"""Replacement and completeness scores on a hand-made 5-node graph, answers worked by hand below.

Nodes [f0, e0, t0, l0, l1] (1 feature, 1 error, 1 token, 2 logits), A[target, source]:
  l0 <- f0: 3, e0: 1      -> normalized row  f0 .75, e0 .25
  l1 <- t0: 1, e0: -1     -> normalized row  t0 .5,  e0 .5
  f0 <- t0: 1, e0: 1      -> normalized row  t0 .5,  e0 .5
Weights w: l0 .6, l1 .4.
Influence: step 1 (w Ā)  f0 .45, e0 .15 + .2 = .35, t0 .2;  step 2 (f0 .45 onward)  t0 .225, e0 .225
  -> I = [f0 .45, e0 .575, t0 .425, l0 0, l1 0].
Replacement = I(t0) / (I(t0) + I(e0)) = .425 / 1 = .425.
Completeness: non-error share of each row  f0 .5, e0 1, t0 1, l0 .75, l1 .5;  I + w = [.45, .575, .425, .6, .4]
  (sum 2.45);  weighted sum .225 + .575 + .425 + .45 + .2 = 1.875  -> 1.875 / 2.45 = 75/98.
Pruned, the edge f0 <- e0 dropped: f0's row is t0 1; I = [f0 .45, e0 .35, t0 .2 + .45 = .65, 0, 0]
  -> replacement .65 / 1 = .65;  completeness (.45 + .35 + .65 + .45 + .2) / 2.45 = 2.1 / 2.45 = 6/7.
"""

import pytest
import torch

from pipeline.tracing.scores import graph_scores

F0, E0, T0, L0, L1 = range(5)


@pytest.fixture
def graph():
    A = torch.zeros(5, 5, dtype=torch.float64)
    A[L0, F0], A[L0, E0] = 3.0, 1.0
    A[L1, T0], A[L1, E0] = 1.0, -1.0
    A[F0, T0], A[F0, E0] = 1.0, 1.0
    weights = torch.tensor([0, 0, 0, 0.6, 0.4], dtype=torch.float64)
    return A, weights


def test_scores_by_hand(graph):
    A, weights = graph
    scores = graph_scores(A, weights, n_features=1, n_errors=1, n_tokens=1)
    assert scores.replacement == pytest.approx(0.425, abs=1e-12)
    assert scores.completeness == pytest.approx(75 / 98, abs=1e-12)


def test_scores_of_the_pruned_graph_follow_the_kept_edges(graph):
    A, weights = graph
    kept = torch.ones(5, 5, dtype=torch.bool)
    kept[F0, E0] = False
    scores = graph_scores(A * kept, weights, n_features=1, n_errors=1, n_tokens=1)
    assert scores.replacement == pytest.approx(0.65, abs=1e-12)
    assert scores.completeness == pytest.approx(6 / 7, abs=1e-12)


def test_a_graph_without_error_input_scores_one(graph):
    A, weights = graph
    A[:, E0] = 0
    assert graph_scores(A, weights, 1, 1, 1) == pytest.approx((1.0, 1.0), abs=1e-12)


def test_bad_layouts_are_refused(graph):
    A, weights = graph
    with pytest.raises(ValueError, match="exceed 5 nodes"):
        graph_scores(A, weights, 2, 2, 2)
    with pytest.raises(ValueError, match="square adjacency"):
        graph_scores(A[:4], weights, 1, 1, 1)
