"""Per-feature statistics in one streaming pass over sparse codes, with memory O(features x top_k).

Shape legend: N tokens (entries), F features, K examples kept per feature.

Each batch brings the non-zero activations of whole contexts as flat arrays
(feature, context, position, value). ``FeatureAccumulator`` keeps, per feature:
the number of non-zero activations, their sum and maximum, and the top-K
examples by peak activation, at most one per context (its peak position).
Merging is exact: a batch's best entries per feature are combined with the
kept ones and the K largest survive, ties broken by the smaller context id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NO_CONTEXT = -1


@dataclass
class CodeBatch:
    """Non-zero activations of a batch of whole contexts, one entry per (token, feature)."""

    feature: torch.Tensor
    """Feature id per entry [N] int64."""
    context: torch.Tensor
    """Global context id per entry [N] int64."""
    position: torch.Tensor
    """Position in the context per entry [N] int64."""
    value: torch.Tensor
    """Activation per entry [N] float32 (> 0)."""

    @classmethod
    def from_codes(
        cls, acts_NK: torch.Tensor, idx_NK: torch.Tensor, context_N: torch.Tensor, position_N: torch.Tensor
    ) -> CodeBatch:
        """From per-token sparse codes (zero entries dropped)."""
        keep = acts_NK > 0
        rows = keep.nonzero()[:, 0]
        return cls(
            feature=idx_NK[keep].long(),
            context=context_N[rows].long(),
            position=position_N[rows].long(),
            value=acts_NK[keep].float(),
        )


def sort_by_keys(*keys: torch.Tensor) -> torch.Tensor:
    """Permutation sorting by ``keys`` ascending, the first key most significant (stable)."""
    order = torch.arange(keys[0].numel())
    for key in reversed(keys):
        order = order[torch.argsort(key[order], stable=True)]
    return order


def per_context_peaks(batch: CodeBatch) -> CodeBatch:
    """For each (feature, context) the entry with the largest value (earliest position on ties)."""
    order = sort_by_keys(batch.feature, batch.context, -batch.value, batch.position)
    f, c = batch.feature[order], batch.context[order]
    first = torch.ones_like(f, dtype=torch.bool)
    first[1:] = (f[1:] != f[:-1]) | (c[1:] != c[:-1])
    chosen = order[first]
    return CodeBatch(batch.feature[chosen], batch.context[chosen], batch.position[chosen], batch.value[chosen])


class FeatureAccumulator:
    """Streaming counts, sums, maxima and top-K examples per feature (see module docstring)."""

    def __init__(self, n_features: int, top_k: int):
        self.n_features, self.top_k = n_features, top_k
        self.count_F = torch.zeros(n_features, dtype=torch.int64)
        self.sum_F = torch.zeros(n_features, dtype=torch.float64)
        self.max_F = torch.zeros(n_features, dtype=torch.float32)
        self.top_value_FK = torch.full((n_features, top_k), -float("inf"))
        self.top_context_FK = torch.full((n_features, top_k), NO_CONTEXT, dtype=torch.int64)
        self.top_position_FK = torch.zeros((n_features, top_k), dtype=torch.int64)
        self.n_tokens = 0

    def update(self, batch: CodeBatch, n_tokens: int) -> None:
        """Add a batch of whole contexts holding ``n_tokens`` indexed (non-special) tokens."""
        self.n_tokens += n_tokens
        if batch.feature.numel() == 0:
            return
        f, v = batch.feature.cpu(), batch.value.cpu()
        self.count_F += torch.bincount(f, minlength=self.n_features)
        self.sum_F.index_add_(0, f, v.double())
        self.max_F.scatter_reduce_(0, f, v, reduce="amax")
        peaks = per_context_peaks(CodeBatch(f, batch.context.cpu(), batch.position.cpu(), v))
        self._merge_top(peaks)

    def _merge_top(self, peaks: CodeBatch) -> None:
        order = sort_by_keys(peaks.feature, -peaks.value, peaks.context)
        f, v = peaks.feature[order], peaks.value[order]
        c, p = peaks.context[order], peaks.position[order]
        starts = torch.searchsorted(f, f, right=False)
        rank = torch.arange(f.numel()) - starts
        keep = rank < self.top_k
        cand_v = torch.full((self.n_features, self.top_k), -float("inf"))
        cand_c = torch.full((self.n_features, self.top_k), NO_CONTEXT, dtype=torch.int64)
        cand_p = torch.zeros((self.n_features, self.top_k), dtype=torch.int64)
        cand_v[f[keep], rank[keep]] = v[keep]
        cand_c[f[keep], rank[keep]] = c[keep]
        cand_p[f[keep], rank[keep]] = p[keep]
        all_v = torch.cat([self.top_value_FK, cand_v], dim=1)
        all_c = torch.cat([self.top_context_FK, cand_c], dim=1)
        all_p = torch.cat([self.top_position_FK, cand_p], dim=1)
        # Highest value first; among equal values the smaller context id (kept entries come from earlier contexts).
        tie_break = all_c.where(all_c >= 0, torch.iinfo(torch.int64).max)
        order = torch.argsort(tie_break, dim=1, stable=True)
        order = order.gather(1, torch.argsort(-all_v.gather(1, order), dim=1, stable=True))[:, : self.top_k]
        self.top_value_FK = all_v.gather(1, order)
        self.top_context_FK = all_c.gather(1, order)
        self.top_position_FK = all_p.gather(1, order)

    def density_F(self) -> torch.Tensor:
        """Fraction of indexed tokens on which each feature is non-zero."""
        return self.count_F.double() / max(1, self.n_tokens)

    def mean_F(self) -> torch.Tensor:
        """Mean of the non-zero activations (0 for dead features)."""
        return (self.sum_F / self.count_F.clamp_min(1)).float()
