"""Every layer's transcoder codes for a batch of contexts, from one live forward or from cached MLP inputs.

Shape legend: B contexts in a batch, T positions, N ordinary tokens of the batch, D d_model, K active latents.

A transcoder of layer L reads that layer's MLP input (``mlp-in``). ``live_mlp_inputs``
captures it at every asked layer in one forward that stops after the deepest one;
a cache that holds ``mlp-in`` at those layers gives the same tensors without the
model. ``encode_layers`` turns each layer's inputs into sparse codes (the
transcoder's own ``encode_sparse``: k entries per token for TopK, zero-padded).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from pipeline.lm.hook_points import HookPoint, capture
from pipeline.sae.transcoder import Transcoder


@torch.inference_mode()
def live_mlp_inputs(
    model: nn.Module, layers: Iterable[int], ids_BT: torch.Tensor, ordinary_BT: torch.Tensor
) -> dict[int, torch.Tensor]:
    """layer -> its MLP input at the ordinary positions [N, D] float32, row-major over (context, position)."""
    points = {layer: HookPoint(layer, "mlp-in") for layer in layers}
    device = next(model.parameters()).device
    captured = capture(model, ids_BT.to(device=device, dtype=torch.long), points.values())
    mask_BT = ordinary_BT.to(device)
    return {layer: captured[point][mask_BT].float() for layer, point in points.items()}


@torch.inference_mode()
def encode_layers(
    transcoders: dict[int, Transcoder], inputs: dict[int, torch.Tensor]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (acts [N, K] float32 on the CPU, latent ids [N, K] int64) of that layer's inputs."""
    codes = {}
    for layer, x_ND in inputs.items():
        tc = transcoders[layer]
        acts_NK, idx_NK = tc.encode_sparse(x_ND.to(tc.W_dec.device, torch.float32))
        codes[layer] = (acts_NK.float().cpu(), idx_NK.long().cpu())
    return codes
