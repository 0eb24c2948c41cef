"""How much of an attribution graph goes through features rather than error nodes: its two scores.

Shape legend: N nodes, laid out [features, errors, tokens, logits]; ``A`` [N, N] holds
direct effects A[target, source].

The definitions are circuit-tracer's (``compute_graph_scores``), written out:
  * Ā = |A| with rows scaled to sum to 1 (``pruning.normalized``); w [N] the target
    weights (each logit's probability, 0 elsewhere); node influence I = w (Ā + Ā² + ...).
  * replacement score = I(tokens) / (I(tokens) + I(errors)), I summed over each kind: of
    the influence that reaches the targets from where a path can start (an input token
    or an error node, the graph's two kinds of leaves), the share that starts at a token,
    i.e. that runs through features only. 1 means no error node matters.
  * completeness score = sum_n (1 - sum_{e error} Ā[n, e]) (I[n] + w[n]) / sum_n (I[n] + w[n]):
    each node's share of direct input that does not come from error nodes, averaged with
    the node's weight on the targets (its influence, plus its own weight for a target logit).
    Nodes with no inputs (tokens, errors, features without rows) count as complete.

``graph_scores`` scores a graph; on a pruned graph, pass its adjacency with the dropped
edges zeroed (``A * edge_mask``), so that influence flows along kept edges only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pipeline.tracing.pruning import influence_from_rows, normalized


class GraphScores(NamedTuple):
    replacement: float
    """Share of the targets' influence from tokens rather than error nodes (1: no error node matters)."""
    completeness: float
    """Influence-weighted share of every node's direct input that does not come from error nodes."""


def graph_scores(A_NN: torch.Tensor, weights_N: torch.Tensor, n_features: int, n_errors: int, n_tokens: int):
    """Replacement and completeness scores (see the module docstring) of a graph laid out
    [features (n_features), errors (n_errors), tokens (n_tokens), logits]."""
    if A_NN.ndim != 2 or A_NN.shape[0] != A_NN.shape[1] or weights_N.shape != A_NN.shape[:1]:
        raise ValueError(f"graph_scores needs a square adjacency and one weight per node, got "
                         f"{tuple(A_NN.shape)} and {tuple(weights_N.shape)}")  # fmt: skip
    if n_features + n_errors + n_tokens > A_NN.shape[0]:
        raise ValueError(f"{n_features} features + {n_errors} errors + {n_tokens} tokens exceed {A_NN.shape[0]} nodes")
    errors = slice(n_features, n_features + n_errors)
    tokens = slice(n_features + n_errors, n_features + n_errors + n_tokens)
    bar_NN = normalized(A_NN)
    influence_N = influence_from_rows(bar_NN, torch.arange(A_NN.shape[0], device=A_NN.device), weights_N)
    from_tokens, from_errors = influence_N[tokens].sum(), influence_N[errors].sum()
    leaves = from_tokens + from_errors
    replacement = from_tokens / leaves if leaves > 0 else torch.zeros_like(leaves)
    complete_N = 1 - bar_NN[:, errors].sum(1)
    out_N = influence_N + weights_N
    completeness = (complete_N * out_N).sum() / out_N.sum().clamp_min(torch.finfo(out_N.dtype).tiny)
    return GraphScores(float(replacement), float(completeness))


def unpruned_and_pruned(A_NN: torch.Tensor, weights_N: torch.Tensor, edge_mask_NN: torch.Tensor, layout) -> dict:
    """Both scores of the graph and of its pruned version (the edges outside ``edge_mask_NN`` zeroed), as
    ``{"unpruned": {"replacement": r, "completeness": c}, "pruned": {...}}``; ``layout`` = (n_features,
    n_errors, n_tokens)."""
    return {
        "unpruned": graph_scores(A_NN, weights_N, *layout)._asdict(),
        "pruned": graph_scores(A_NN * edge_mask_NN, weights_N, *layout)._asdict(),
    }
