"""Data-dependent starting points: the input scale factor and the decoder bias.

Shape legend: N tokens, D d_in.
"""

from __future__ import annotations

import math

import torch


def normalization_factor(sample_ND: torch.Tensor) -> float:
    """s such that E||s * x|| = sqrt(D) on the sample (estimated once, before training)."""
    mean_norm = sample_ND.float().norm(dim=1).mean().item()
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise ValueError(f"cannot normalize activations: mean norm of the sample is {mean_norm}")
    return math.sqrt(sample_ND.shape[1]) / mean_norm


def geometric_median(points_ND: torch.Tensor, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Point minimizing the summed Euclidean distance to all points (Weiszfeld's algorithm), float64."""
    points = points_ND.double()
    guess = points.mean(0)
    for _ in range(iterations):
        distances = (points - guess).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / distances
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        moved = (updated - guess).norm() / guess.norm().clamp_min(1e-12)
        guess = updated
        if moved < tol:
            break
    return guess.float()
