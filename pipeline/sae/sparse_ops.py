"""Sparse kernels for TopK SAEs: touch only the K active latents in forward and backward.

Shape legend: N tokens, D d_in, F latents, K active latents per token.

* ``sparse_decode(acts_NK, idx_NK, W_FD)``: ``sum_k acts[n, k] * W[idx[n, k]]``
  through ``embedding_bag``, whose native backward is sparse too. Never forms
  the dense [N, F] code or a [N, F] x [F, D] product.
* ``encode_selected(x_ND, b_dec_D, W_enc_FD, b_F, idx_NK, pre_NF)``:
  ``((x - b_dec) @ W_enc + b)`` at the given latents (the encoder is held as
  [F, D] so that its gradient comes out contiguous). The forward reads the
  pre-activations the caller already computed (it needs them all to pick the
  top k); the backward builds dW from the N*K selected entries as one CSR x
  dense product instead of the dense [D, N] x [N, F] one, db by ``index_add``,
  and d b_dec as ``-db @ W`` (no per-token input gradient is formed).

Each has a dense eager twin (``*_eager``) that the tests hold it to, values and
gradients. Measured on 2 CPU cores at N=4096, D=576, F=4608, K=32: the dense
weight gradient takes ~190 ms, the CSR one ~16 ms; a dense decode ~210 ms,
``embedding_bag`` forward + backward ~28 ms.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def sparse_matmul(vals_NK: torch.Tensor, idx_NK: torch.Tensor, W_FD: torch.Tensor) -> torch.Tensor:
    """out[n] = sum_k vals[n, k] * W[idx[n, k]]  ->  [N, D]."""
    return F.embedding_bag(idx_NK, W_FD, per_sample_weights=vals_NK.to(W_FD.dtype), mode="sum")


def sparse_transpose_matmul(
    vals_NK: torch.Tensor, idx_NK: torch.Tensor, M_ND: torch.Tensor, n_latents: int
) -> torch.Tensor:
    """out[f] = sum over (n, k) with idx[n, k] == f of vals[n, k] * M[n]  ->  [F, D] (CSR product)."""
    n_tokens, k = idx_NK.shape
    flat_idx = idx_NK.reshape(-1)
    order = torch.argsort(flat_idx, stable=True)
    token_of_entry = torch.div(order, k, rounding_mode="floor")
    row_counts = torch.bincount(flat_idx, minlength=n_latents)
    crow = torch.zeros(n_latents + 1, dtype=torch.int64, device=idx_NK.device)
    crow[1:] = row_counts.cumsum(0)
    values = vals_NK.reshape(-1)[order].to(M_ND.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta"
        S_FN = torch.sparse_csr_tensor(crow, token_of_entry, values, size=(n_latents, n_tokens), check_invariants=False)
        return S_FN @ M_ND


class _EncodeSelected(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, b_dec_D, W_FD, b_enc_F, idx_NK, pre_NF):
        ctx.save_for_backward(x_ND, b_dec_D, W_FD, idx_NK)
        return pre_NF.gather(1, idx_NK)

    @staticmethod
    def backward(ctx, grad_NK):
        x_ND, b_dec_D, W_FD, idx_NK = ctx.saved_tensors
        work = torch.promote_types(grad_NK.dtype, torch.float32)
        grad_NK = grad_NK.to(work).contiguous()
        n_latents = W_FD.shape[0]
        # d/db_enc: each selected entry adds its gradient to its latent.
        grad_b_enc = torch.zeros(n_latents, dtype=work, device=grad_NK.device)
        grad_b_enc.index_add_(0, idx_NK.reshape(-1), grad_NK.reshape(-1))
        grad_x = grad_b_dec = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_x = sparse_matmul(grad_NK, idx_NK, W_FD.to(work)).to(x_ND.dtype)
        if ctx.needs_input_grad[1]:
            # sum_n d/dx_n = grad_b_enc @ W, and the encoder's input is x - b_dec.
            grad_b_dec = -(grad_b_enc @ W_FD.to(work)).to(b_dec_D.dtype)
        if ctx.needs_input_grad[2]:
            # S^T (x - b_dec) = S^T x - (column sums of S) b_dec^T, S the sparse gradient [N, F].
            grad_W = sparse_transpose_matmul(grad_NK, idx_NK, x_ND.to(work), n_latents)
            grad_W = grad_W.addr_(grad_b_enc, b_dec_D.to(work), alpha=-1).to(W_FD.dtype)
        grad_b = grad_b_enc.to(W_FD.dtype) if ctx.needs_input_grad[3] else None
        return grad_x, grad_b_dec, grad_W, grad_b, None, None


def encode_selected(x_ND, b_dec_D, W_enc_FD, b_enc_F, idx_NK, pre_NF) -> torch.Tensor:
    """((x - b_dec) @ W_enc_FD^T + b_enc) at latents idx [N, K].

    ``pre_NF`` must hold that product for all latents, computed without grad; the
    backward touches only the N*K selected entries.
    """
    return _EncodeSelected.apply(x_ND, b_dec_D, W_enc_FD, b_enc_F, idx_NK, pre_NF)


def sparse_decode(acts_NK, idx_NK, W_FD) -> torch.Tensor:
    """sum_k acts[n, k] * W[idx[n, k]] [N, D], sparse in forward and backward."""
    return sparse_matmul(acts_NK, idx_NK, W_FD)


def encode_selected_eager(x_ND, b_dec_D, W_enc_FD, b_enc_F, idx_NK) -> torch.Tensor:
    """Dense twin of ``encode_selected`` (full [N, F] product, autograd backward)."""
    return ((x_ND - b_dec_D) @ W_enc_FD.t() + b_enc_F).gather(1, idx_NK)


def sparse_decode_eager(acts_NK, idx_NK, W_FD) -> torch.Tensor:
    """Dense twin of ``sparse_decode`` (scatter into [N, F], then a dense product)."""
    dense_NF = torch.zeros(acts_NK.shape[0], W_FD.shape[0], dtype=W_FD.dtype, device=W_FD.device)
    dense_NF = dense_NF.scatter_add(1, idx_NK, acts_NK.to(W_FD.dtype))
    return dense_NF @ W_FD
