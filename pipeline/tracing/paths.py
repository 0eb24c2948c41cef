"""The strongest paths of a pruned attribution graph, from an input token to a target.

Shape legend: N nodes; ``A`` [N, N] holds direct effects A[target, source].

A path's strength is the product, along its edges, of each edge's share of its
target's absolute input: W[t, s] = |A[t, s]| / sum_s' |A[t, s']| over the kept
edges. ``best[n]``, the strongest path from any input node up to n, satisfies
best[input] = 1 and best[n] = max_s W[n, s] * best[s]; the graph is a DAG, so
relaxing that equation as many times as it is deep reaches the exact maximum.
The k paths reported start with the target's k strongest first hops (by
W[t, s] * best[s]) and then follow the best predecessor of each node down.
"""

from __future__ import annotations

import torch


def edge_shares(A_NN: torch.Tensor, edge_mask_NN: torch.Tensor) -> torch.Tensor:
    """W [N, N]: each kept edge's share of its target's absolute input (rows of no input stay 0)."""
    W = (A_NN.abs() * edge_mask_NN).double()
    total = W.sum(1, keepdim=True)
    return torch.where(total > 0, W / total.clamp_min(1e-300), torch.zeros_like(W))


def best_from_inputs(W_NN: torch.Tensor, inputs_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(best [N], predecessor [N]): the strongest path from an input to each node, and its last hop (-1: none)."""
    n = W_NN.shape[0]
    best = inputs_N.double().clone()
    before = torch.full((n,), -1, dtype=torch.long)
    for _ in range(n):
        through, via = (W_NN * best[None, :]).max(1)
        better = (through > best) & ~inputs_N
        if not better.any():
            break
        best = torch.where(better, through, best)
        before = torch.where(better, via, before)
    return best, before


def strongest_paths(
    A_NN: torch.Tensor,
    edge_mask_NN: torch.Tensor,
    inputs_N: torch.Tensor,
    target: int,
    k: int = 3,
    last_hop_from: torch.Tensor | None = None,
) -> list[tuple[list[int], float]]:
    """Up to k paths [input, ..., target] with their strengths, strongest first (see the module docstring).

    ``last_hop_from`` [N] (bool) limits the node the path reaches the target from, e.g. to
    features, so paths through the model are not hidden by the direct token-to-logit edges.
    """
    W = edge_shares(A_NN, edge_mask_NN)
    best, before = best_from_inputs(W, inputs_N)
    first_hops = W[target] * best
    if last_hop_from is not None:
        first_hops = first_hops * last_hop_from
    paths = []
    for source in first_hops.argsort(descending=True)[:k].tolist():
        if first_hops[source] <= 0:
            break
        path = [target, source]
        while before[path[-1]] >= 0 and len(path) <= A_NN.shape[0]:
            path.append(int(before[path[-1]]))
        paths.append((path[::-1], float(first_hops[source])))
    return paths
