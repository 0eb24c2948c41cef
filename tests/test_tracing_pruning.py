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


def test_edges_are_ranked_on_the_pruned_graph_by_hand():
    """Edge influence uses the pruned graph's own row shares and influence, not the unpruned ones.

    Nodes [f0, f1, f2, f3, e0, t0, t1, l0], A[target, source] (row shares in brackets):
      l0 <- f0 1, f1 1, e0 5, f3 1   (1/8 1/8 5/8 1/8)      f0 <- t0 1, f2 2   (1/3 2/3)
      f1 <- t1 1                     (1)                    f2 <- t0 1         (1)
      f3 <- f1 2, t0 1               (2/3 1/3)
    I in 24ths: f0 3, f1 3 + 2 = 5, f2 2, f3 3, e0 15, t0 1 + 1 + 2 = 4, t1 3 + 2 = 5 (total 37); 80% = 29.6:
      sorted e0 15, f1 5, t1 5, t0 4, f0 3 (before 29, kept), f3 3 (before 32, dropped), f2 dropped.
    Pruned: l0 <- f0 1/7, f1 1/7, e0 5/7; f0 <- t0 1; f1 <- t1 1; I' = f0 1/7, f1 1/7, e0 5/7.
      Edge influence: l0<-e0 5/7, then 1/7 each for f0<-t0, f1<-t1, l0<-f0, l0<-f1 (total 9/7, 80% = 7.2/7):
      kept up to l0<-f0 (before 7/7); l0<-f1 (before 8/7) dropped, so f1 (no output) and f1<-t1 go.
    With the unpruned I (f0 3/24, f1 5/24) instead: f1<-t1 5/24 outranks f0<-t0 3/24, which is dropped
      (before 29/24 > 80% of 32/24), and f0 goes instead of f1.
    With the unpruned row shares (l0 <- f0 1/8, f1 1/8, e0 5/8; f0 <- t0 1/3): only l0<-e0 survives.
    """
    names = "f0 f1 f2 f3 e0 t0 t1 l0".split()
    f0, f1, f2, f3, e0, t0, t1, l0 = range(8)
    A = torch.zeros(8, 8, dtype=torch.float64)
    A[l0, f0], A[l0, f1], A[l0, e0], A[l0, f3] = 1.0, 1.0, 5.0, 1.0
    A[f0, t0], A[f0, f2], A[f1, t1], A[f2, t0], A[f3, f1], A[f3, t0] = 1.0, 2.0, 1.0, 1.0, 2.0, 1.0
    weights = torch.zeros(8, dtype=torch.float64)
    weights[l0] = 1.0
    result = prune(A, weights, n_features=4, n_errors=1, node_threshold=0.8, edge_threshold=0.8)
    assert [names[i] for i in result.node_mask_N.nonzero().flatten().tolist()] == ["f0", "e0", "t0", "t1", "l0"]
    edges = {(names[t], names[s]) for t, s in result.edge_mask_NN.nonzero().tolist()}
    assert edges == {("f0", "t0"), ("l0", "f0"), ("l0", "e0")}
    expected = torch.tensor([3, 5, 2, 3, 15, 4, 5, 0], dtype=torch.float64) / 24
    torch.testing.assert_close(result.influence_N, expected, rtol=0, atol=1e-12)
