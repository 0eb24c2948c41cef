"""Probe a text: which SAE features fire on each of its tokens.

Shape legend: T positions, D d_model, F latents, K features kept per token.
The model runs only up to the SAE's layer (later blocks never run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.lm.hooks import residual_after_block
from pipeline.sae.model import Sae


@dataclass(frozen=True)
class ProbeResult:
    """Feature activations of one text."""

    token_ids: list[int]
    feats_TF: torch.Tensor
    """Every feature's activation at every position (dense, float32, on CPU)."""

    def top_features(self, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [T, K], feature ids [T, K]) of the strongest features at each position."""
        best = self.feats_TF.topk(min(k, self.feats_TF.shape[1]), dim=1)
        return best.values, best.indices

    def activations_of(self, feature: int) -> list[float]:
        return self.feats_TF[:, feature].tolist()


@torch.inference_mode()
def probe(model: nn.Module, sae: Sae, layer: int, token_ids: list[int]) -> ProbeResult:
    """Run ``token_ids`` to block ``layer`` and encode every position with the SAE."""
    device = next(model.parameters()).device
    hidden_TD = residual_after_block(model, torch.tensor([token_ids], device=device), layer)[0]
    feats_TF = sae.encode(hidden_TD.float().to(sae.W_dec.device)).float().cpu()
    return ProbeResult(list(token_ids), feats_TF)
