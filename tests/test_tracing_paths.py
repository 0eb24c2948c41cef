"""Strongest paths on a hand-made graph: shares, the best predecessor chain, and the k first hops."""

import torch

from pipeline.tracing.paths import edge_shares, strongest_paths


def test_paths_follow_the_largest_products_of_shares():
    # nodes: 0, 1 inputs; 2, 3 features; 4 target.  A[target, source]
    A = torch.zeros(5, 5)
    A[2, 0], A[2, 1] = 3.0, 1.0  # 2 <- 0 (0.75), 1 (0.25)
    A[3, 1] = -2.0  # 3 <- 1 (1.0)
    A[4, 2], A[4, 3], A[4, 0] = 1.0, 1.0, -2.0  # 4 <- 2 (0.25), 3 (0.25), 0 (0.5)
    mask = A != 0
    inputs = torch.tensor([True, True, False, False, False])
    W = edge_shares(A, mask)
    torch.testing.assert_close(W[4], torch.tensor([0.5, 0, 0.25, 0.25, 0], dtype=torch.float64))
    paths = strongest_paths(A, mask, inputs, target=4, k=3)
    assert [p for p, _ in paths] == [[0, 4], [1, 3, 4], [0, 2, 4]]
    strengths = [s for _, s in paths]
    assert strengths == [0.5, 0.25, 0.25 * 0.75]


def test_masked_edges_are_not_walked():
    A = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]])
    mask = torch.tensor([[False] * 3, [True, False, False], [False] * 3])
    assert strongest_paths(A, mask, torch.tensor([True, False, False]), target=2) == []


def test_the_last_hop_can_be_limited_to_features():
    A = torch.zeros(4, 4)
    A[2, 0] = 1.0  # feature 2 <- input 0
    A[3, 0], A[3, 2] = 3.0, 1.0  # target 3 <- input 0 (direct, 0.75), feature 2 (0.25)
    inputs = torch.tensor([True, False, False, False])
    features = torch.tensor([False, False, True, False])
    assert strongest_paths(A, A != 0, inputs, 3, k=1) == [([0, 3], 0.75)]
    assert strongest_paths(A, A != 0, inputs, 3, k=2, last_hop_from=features) == [([0, 2, 3], 0.25)]
