"""AuxK (Gao et al. 2024, appendix B.1): reconstruct the residual from the top pre-activations of dead latents.

Shape legend: N tokens, D d_in, F latents, K active latents.

Two paths give the same loss and gradients: a dense [N, n_dead] block when few
latents are dead (a small matmul beats sorting N * k_aux entries) and the sparse
kernels when many are (``DENSE_AUX_MAX_DEAD`` decides); a test holds them equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.sae.model import Sae, SaeOutput
from pipeline.sae.sparse_ops import encode_selected, sparse_decode

DENSE_AUX_MAX_DEAD = 2048


def _aux_reconstruction_sparse(sae: Sae, x_ND: torch.Tensor, out: SaeOutput, dead_ids: torch.Tensor, k_aux: int):
    """Top-k_aux dead latents per token through the sparse kernels (many dead latents)."""
    local = out.pre_NF[:, dead_ids].topk(k_aux, dim=1, sorted=False).indices
    idx_NK = dead_ids[local]
    acts_NK = torch.relu(encode_selected(x_ND, sae.input_offset, sae.W_enc_FD, sae.b_enc, idx_NK, out.pre_NF))
    return sparse_decode(acts_NK, idx_NK, sae.W_dec)


def _aux_reconstruction_dense(sae: Sae, x_ND: torch.Tensor, dead_ids: torch.Tensor, k_aux: int):
    """The same over a dense [N, n_dead] block (few dead latents: a small matmul beats sorting N*k_aux entries)."""
    pre_ND_dead = F.linear(x_ND - sae.input_offset, sae.W_enc_FD[dead_ids], sae.b_enc[dead_ids])
    if k_aux < dead_ids.numel():
        keep = torch.zeros_like(pre_ND_dead, dtype=torch.bool)
        keep.scatter_(1, pre_ND_dead.detach().topk(k_aux, dim=1, sorted=False).indices, True)
        pre_ND_dead = pre_ND_dead * keep
    return torch.relu(pre_ND_dead) @ sae.W_dec[dead_ids]


def auxk_loss(
    sae: Sae,
    x_ND: torch.Tensor,
    out: SaeOutput,
    dead_F: torch.Tensor,
    variance: torch.Tensor | None = None,
    target_ND: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalized error of reconstructing the residual from the top dead latents (0 if none are dead).

    k_aux = min(d_in / 2, number of dead latents), scaled down by n_dead / k_aux when fewer
    latents are dead than that (Gao et al. 2024, appendix B.1). ``variance`` is the
    residual's total variance over the whole batch (given when the batch is split across
    ranks); by default it is computed from the residual. ``target_ND`` is what the
    SAE reconstructs when that is not its input (a transcoder's MLP output).
    """
    dead_ids = dead_F.nonzero().squeeze(1)
    if dead_ids.numel() == 0:
        return x_ND.new_zeros(())
    k_aux = min(sae.cfg.d_in // 2, dead_ids.numel())
    if dead_ids.numel() <= DENSE_AUX_MAX_DEAD:
        e_hat_ND = _aux_reconstruction_dense(sae, x_ND, dead_ids, k_aux).float()
    else:
        e_hat_ND = _aux_reconstruction_sparse(sae, x_ND, out, dead_ids, k_aux).float()
    residual_ND = ((x_ND if target_ND is None else target_ND) - out.x_hat_ND).detach().float()
    if variance is None:
        variance = (residual_ND - residual_ND.mean(0)).pow(2).sum()
    variance = variance.clamp_min(1e-12)
    scale = min(dead_ids.numel() / k_aux, 1.0)
    return scale * (e_hat_ND - residual_ND).pow(2).sum() / variance
