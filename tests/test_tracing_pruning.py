"""Influence pruning on a hand-made 5-node graph, answers computed by hand in the comments.

Nodes [f0, f1, e0, t0, l0] (2 features, 1 error, 1 token, 1 logit), A[target, source]:
  l0 <- f0: 2, f1: 1.2, e0: -0.8   -> normalized row  f0 .5, f1 .3, e0 .2
  f1 <- f0: 1, t0: 3               -> normalized row  f0 .25, t0 .75
  f0 <- t0: -2                     -> normalized row  t0 1
Influence with w = l0: step 1 f0 .5, f1 .3, e0 .2; step 2 f0 .075, t0 .725; step 3 t0 .075
  -> I = [f0 .575, f1 .3, e0 .2, t0 .8, l0 0], total 1.875;
  sorted t0 .8 (cum .4267), f0 .575 (.7333), f1 .3 (.8933), e0 .2 (1): 80% keeps t0, f0, f1.
Without e0: l0 row f0 .625, f1 .375; I' = [f0 .71875, f1 .375, t0 1];
  edge influences  f0<-t0 .71875, l0<-f0 .625, l0<-f1 .375, f1<-t0 .28125, f1<-f0 .09375
  (total 2.09375; cumulative .3433, .6418, .8209, .9552, 1).
"""

import pytest
import torch

from pipeline.tracing.pruning import cumulative_share, node_influence, prune, top_share

F0, F1, E0, T0, L0 = range(5)


@pytest.fixture
def graph():
    A = torch.zeros(5, 5, dtype=torch.float64)
    A[L0, F0], A[L0, F1], A[L0, E0] = 2.0, 1.2, -0.8
    A[F1, F0], A[F1, T0] = 1.0, 3.0
    A[F0, T0] = -2.0
    weights = torch.zeros(5, dtype=torch.float64)
    weights[L0] = 1.0
    return A, weights


def test_node_influence_is_the_matrix_series(graph):
    A, weights = graph
    expected = torch.tensor([0.575, 0.3, 0.2, 0.8, 0.0], dtype=torch.float64)
    torch.testing.assert_close(node_influence(A, weights), expected, rtol=0, atol=1e-12)
    A_bar = A.abs() / A.abs().sum(1, keepdim=True).clamp_min(1e-300)
    series = torch.linalg.inv(torch.eye(5, dtype=torch.float64) - A_bar) - torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(weights @ series, expected, rtol=0, atol=1e-12)
    shares = torch.tensor([0.575 + 0.8, 1.675, 1.875, 0.8, 1.875], dtype=torch.float64) / 1.875
    torch.testing.assert_close(cumulative_share(expected), shares, rtol=0, atol=1e-12)


def test_top_share_includes_the_crossing_score():
    scores = torch.tensor([0.1, 0.5, 0.0, 0.4])
    assert top_share(scores, 0.45).tolist() == [False, True, False, False]
    assert top_share(scores, 0.51).tolist() == [False, True, False, True]
    assert top_share(scores, 1.0).tolist() == [True, True, False, True]


@pytest.mark.parametrize(
    ("edge_threshold", "nodes", "edges"),
    [
        (0.98, [F0, F1, T0, L0], {(F0, T0), (L0, F0), (L0, F1), (F1, T0), (F1, F0)}),
        (0.9, [F0, F1, T0, L0], {(F0, T0), (L0, F0), (L0, F1), (F1, T0)}),
        # f1 loses both inputs, so it is dropped and takes l0 <- f1 with it
        (0.8, [F0, T0, L0], {(F0, T0), (L0, F0)}),
    ],
)
def test_prune_by_hand(graph, edge_threshold, nodes, edges):
    A, weights = graph
    result = prune(A, weights, n_features=2, n_errors=1, node_threshold=0.8, edge_threshold=edge_threshold)
    assert result.node_mask_N.nonzero().flatten().tolist() == nodes
    assert {tuple(e) for e in result.edge_mask_NN.nonzero().tolist()} == edges


def test_thresholds_are_checked(graph):
    with pytest.raises(ValueError, match="node_threshold must be between 0 and 1"):
        prune(*graph, n_features=2, n_errors=1, node_threshold=80)
