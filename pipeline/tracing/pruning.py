"""Influence pruning of an attribution graph (the definition circuit-tracer uses, written out).

Shape legend: N nodes. ``A`` [N, N] holds direct effects, A[target, source]; nodes are
laid out as [features, errors, tokens (embeddings), logits].

Definitions:
  * Ā = |A| with each row divided by its sum (rows that sum to 0 stay 0): the share of a
    node's total absolute input that each source provides.
  * w [N]: the target weights, each target logit's probability, 0 elsewhere.
  * node influence I = w (Ā + Ā² + Ā³ + ...) = w ((1 - Ā)^-1 - 1): how much of the
    probability-weighted targets flows through each node along all paths. The graph is a
    DAG, so the series ends (exactly) after at most its depth; it is summed term by term.
  * ``top_share(scores, q)``: the smallest set of highest scores whose sum reaches
    q x (sum of all scores), the one that crosses included; ties broken by position.
  * nodes kept: top_share(I, node_threshold) over all nodes, plus every token and
    logit node, always.
  * edges: with A' = A restricted to the kept nodes (other rows and columns zeroed),
    Ā' and I' as above, the edge influence is E[t, s] = Ā'[t, s] (I'[t] + w[t]);
    edges kept: top_share(E, edge_threshold) over all entries.
  * clean-up, repeated until nothing changes: a feature or error node with no kept
    outgoing edge, or a feature node with no kept incoming edge, is dropped, and so
    are the edges that touch a dropped node.
  * ``cumulative``: per node, the share of total node influence held by it and every
    node with a larger influence (what the Neuronpedia viewer calls ``influence``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def normalized(A_RN: torch.Tensor) -> torch.Tensor:
    """|A| with rows scaled to sum to 1 (zero rows stay zero)."""
    absolute = A_RN.abs()
    return absolute / absolute.sum(1, keepdim=True).clamp_min(torch.finfo(absolute.dtype).tiny)


def influence_from_rows(rows_RN: torch.Tensor, row_nodes_R: torch.Tensor, weights_R: torch.Tensor) -> torch.Tensor:
    """Node influence [N] of a graph given only by its non-zero rows (row r is node ``row_nodes_R[r]``'s inputs).

    ``weights_R`` weights each row's node as a target; the rows must already be normalized.
    Paths are followed on the rows' own nodes only (R x R), then read out once onto all N:
    I = (sum_k w Q^k) Ā with Q = Ā[:, row nodes], the same series as w (Ā + Ā² + ...).
    """
    Q_RR = rows_RN[:, row_nodes_R]
    current_R, visits_R = weights_R, weights_R.clone()
    for _ in range(rows_RN.shape[0] + 1):
        current_R = current_R @ Q_RR
        if not current_R.any():
            return visits_R @ rows_RN
        visits_R = visits_R + current_R
    raise ValueError("influence does not converge: the graph has a cycle (A must be a DAG)")


def node_influence(A_NN: torch.Tensor, weights_N: torch.Tensor) -> torch.Tensor:
    """w (Ā + Ā² + ...) [N] for a square adjacency A[target, source]."""
    return influence_from_rows(normalized(A_NN), torch.arange(A_NN.shape[0], device=A_NN.device), weights_N)


def top_share(scores: torch.Tensor, share: float) -> torch.Tensor:
    """Boolean mask (shape of ``scores``) of the fewest highest scores whose sum reaches share x total."""
    flat = scores.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices
    before = torch.cumsum(flat[order], 0) - flat[order]
    keep_sorted = (before < share * flat.sum()) & (flat[order] > 0)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order] = keep_sorted
    return mask.view_as(scores)


def cumulative_share(influence_N: torch.Tensor) -> torch.Tensor:
    """Per node, the share of total influence held by the nodes at least as influential (sorted, stable)."""
    order = torch.sort(influence_N, descending=True, stable=True).indices
    shares = torch.cumsum(influence_N[order], 0) / influence_N.sum().clamp_min(torch.finfo(influence_N.dtype).tiny)
    out = torch.empty_like(influence_N)
    out[order] = shares
    return out


class Pruned(NamedTuple):
    """Which nodes and edges survive pruning, and the influences that decided it."""

    node_mask_N: torch.Tensor
    edge_mask_NN: torch.Tensor
    """edge_mask[target, source]."""
    influence_N: torch.Tensor
    """Node influence I on the unpruned graph."""
    cumulative_N: torch.Tensor
    """Share of total influence held by this node and the more influential ones."""


def _clean_up(node_mask: torch.Tensor, edge_mask: torch.Tensor, n_features: int, n_sources: int) -> None:
    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        keep = node_mask.clone()
        keep[:n_sources] &= edge_mask[:, :n_sources].any(0)
        keep[:n_features] &= edge_mask[:n_features].any(1)
        if torch.equal(keep, node_mask):
            return
        node_mask.copy_(keep)


def prune(
    A_NN: torch.Tensor,
    target_weights_N: torch.Tensor,
    n_features: int,
    n_errors: int,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> Pruned:
    """Prune a graph laid out [features, errors, tokens, logits] (see the module docstring)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    n_sources = n_features + n_errors
    influence = node_influence(A_NN, target_weights_N)
    node_mask = top_share(influence, node_threshold)
    node_mask[n_sources:] = True
    pruned = A_NN * (node_mask[:, None] & node_mask[None, :])
    pruned_bar = normalized(pruned)
    flow = node_influence(pruned, target_weights_N) + target_weights_N
    edge_mask = top_share(pruned_bar * flow[:, None], edge_threshold)
    _clean_up(node_mask, edge_mask, n_features, n_sources)
    return Pruned(node_mask, edge_mask, influence, cumulative_share(influence))
