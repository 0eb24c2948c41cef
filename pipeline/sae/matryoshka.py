"""Matryoshka prefixes (Bussmann et al. 2025): their widths and the nested reconstructions.

Shape legend: N tokens, D d_in, F latents, K active latents, M prefixes.

A Matryoshka SAE orders its dictionary: prefix m holds latents ``0 .. widths[m] - 1``
and must reconstruct the input on its own, ``x_hat_m = b_dec + sum_{i < widths[m]} f_i W_dec[i]``,
so general features settle in the first latents instead of being absorbed by the
specific ones that follow. ``widths`` is strictly increasing and ends at d_sae.

``prefix_decode`` gives every prefix's reconstruction (without b_dec) from sparse
codes in one ``embedding_bag``: each token's active entries are grouped by the
band ``widths[m-1] <= idx < widths[m]`` they fall in, each (token, band) bag is
summed, and a cumulative sum over bands gives the prefixes. No dense [N, F] code
and no [N, F] x [F, D] product; ``prefix_decode_eager`` is its dense twin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def default_widths(d_sae: int) -> tuple[int, ...]:
    """d_sae/16, d_sae/8, d_sae/4, d_sae/2, d_sae (integer parts; repeats and zeros dropped)."""
    return tuple(sorted({d_sae >> shift for shift in range(5)} - {0}))


def check_widths(widths: tuple[int, ...], d_sae: int) -> None:
    """ValueError unless ``widths`` is a non-empty, strictly increasing list of positive ints ending at d_sae."""
    shown = ",".join(str(w) for w in widths)
    if not widths:
        raise ValueError("needs at least one width")
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
        raise ValueError(f"widths must be positive integers, got {shown}")
    if any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
        raise ValueError(f"widths must be strictly increasing, got {shown}")
    if widths[-1] != d_sae:
        raise ValueError(f"the last width must be d_sae = {d_sae}, got {shown}")


def prefix_bands(idx_NK: torch.Tensor, widths: tuple[int, ...]) -> torch.Tensor:
    """Per entry the first prefix that contains its latent: m with widths[m-1] <= idx < widths[m]  [N, K]."""
    boundaries = torch.tensor(widths, dtype=idx_NK.dtype, device=idx_NK.device)
    return torch.bucketize(idx_NK, boundaries, right=True)


def prefix_decode(acts_NK: torch.Tensor, idx_NK: torch.Tensor, W_FD: torch.Tensor, widths) -> torch.Tensor:
    """sum_{k: idx[n, k] < widths[m]} acts[n, k] * W[idx[n, k]]  ->  [N, M, D] (no b_dec), sparse both ways."""
    n_tokens, n_prefixes = idx_NK.shape[0], len(widths)
    bag_NK = prefix_bands(idx_NK, widths) + n_prefixes * torch.arange(n_tokens, device=idx_NK.device)[:, None]
    flat_bag = bag_NK.reshape(-1)
    order = torch.argsort(flat_bag, stable=True)
    counts = torch.bincount(flat_bag, minlength=n_tokens * n_prefixes)
    offsets = counts.cumsum(0) - counts
    values = acts_NK.reshape(-1)[order].to(W_FD.dtype)
    bands = F.embedding_bag(idx_NK.reshape(-1)[order], W_FD, offsets, mode="sum", per_sample_weights=values)
    return bands.reshape(n_tokens, n_prefixes, -1).cumsum(1)


def prefix_decode_eager(acts_NK: torch.Tensor, idx_NK: torch.Tensor, W_FD: torch.Tensor, widths) -> torch.Tensor:
    """Dense twin of ``prefix_decode``: scatter into [N, F], then one product per prefix."""
    dense_NF = torch.zeros(acts_NK.shape[0], W_FD.shape[0], dtype=W_FD.dtype, device=W_FD.device)
    dense_NF = dense_NF.scatter_add(1, idx_NK, acts_NK.to(W_FD.dtype))
    return torch.stack([dense_NF[:, :w] @ W_FD[:w] for w in widths], dim=1)


def prefix_l0(acts_NK: torch.Tensor, idx_NK: torch.Tensor, widths) -> torch.Tensor:
    """Active latents per token inside each prefix  [N, M]."""
    active_NK = acts_NK > 0
    return torch.stack([(active_NK & (idx_NK < w)).sum(1) for w in widths], dim=1)
