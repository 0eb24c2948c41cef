"""Probe a text: which SAE features fire on each of its tokens.

Shape legend: T positions, D d_model, F latents, K features kept per token.
The model runs only up to the block of the SAE's hook point (later blocks never
run) and reads the activation there, as the cache did. Special
positions (BOS, EOS, padding) are marked: their activations are huge outliers,
so training and indexing leave them out, and the ranking here does too unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.lm.hook_points import HookPoint, as_hook_point, capture
from pipeline.sae.model import Sae


@dataclass(frozen=True)
class ProbeResult:
    """Feature activations of one text."""

    token_ids: list[int]
    feats_TF: torch.Tensor
    """Every feature's activation at every position (dense, float32, on CPU)."""
    special_T: tuple[bool, ...] = ()
    """Per position, whether it holds a special token (empty: none marked)."""

    def is_special(self, position: int) -> bool:
        return bool(self.special_T) and self.special_T[position]

    def top_features(self, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [T, K], feature ids [T, K]) of the strongest features at each position."""
        best = self.feats_TF.topk(min(k, self.feats_TF.shape[1]), dim=1)
        return best.values, best.indices

    def activations_of(self, feature: int, include_special: bool = True) -> list[float]:
        """The feature's activation per position (0 at special positions unless ``include_special``)."""
        return [
            0.0 if (not include_special and self.is_special(t)) else value
            for t, value in enumerate(self.feats_TF[:, feature].tolist())
        ]

    def strongest(self, limit: int, include_special: bool = False) -> list[tuple[int, float]]:
        """(feature, max activation) of the features that fire, strongest first, over the counted positions."""
        keep_T = torch.tensor([include_special or not self.is_special(t) for t in range(len(self.token_ids))])
        if not keep_T.any():
            return []
        peak_F = self.feats_TF[keep_T].max(dim=0).values
        order = torch.argsort(peak_F, descending=True, stable=True)[:limit]
        return [(int(f), float(peak_F[f])) for f in order if peak_F[f] > 0]


@torch.inference_mode()
def probe(model: nn.Module, sae: Sae, point: HookPoint | int, token_ids: list[int], special_ids=()) -> ProbeResult:
    """Read ``token_ids`` at ``point`` (a block index: its output), encode every position; mark ``special_ids``."""
    device = next(model.parameters()).device
    point = as_hook_point(point)
    hidden_TD = capture(model, torch.tensor([token_ids], device=device), [point])[point][0]
    feats_TF = sae.encode(hidden_TD.float().to(sae.W_dec.device)).float().cpu()
    special = set(special_ids)
    return ProbeResult(list(token_ids), feats_TF, tuple(t in special for t in token_ids))
