"""Starting points: the input scale factor, the decoder bias, and the initial SAE.

Shape legend: N tokens, D d_in.

``init_sae`` draws random unit-norm decoder rows (norm 0.1 for ReLU SAEs, as in
Anthropic's April 2024 update), sets the encoder to the decoder's transpose times
``ENCODER_INIT_SCALE`` and ``b_dec`` to the geometric median of a sample. The 0.5
was chosen by measurement on SmolLM2 layer 15 (d_sae 4608 and 16384, k 32): held-out
FVU after one pass over 184k tokens fell from 0.14-0.15 to 0.107 (4608) and from
0.187 to 0.111 (16384), and after ten passes from 0.068 to 0.067.
"""

from __future__ import annotations

import math

import torch

from pipeline.sae.model import Sae, SaeConfig
from pipeline.sae.transcoder import Transcoder

ENCODER_INIT_SCALE = 0.5
RELU_DECODER_NORM = 0.1


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


def init_sae(cfg: SaeConfig, sample_ND: torch.Tensor, seed: int) -> Sae:
    """A fresh SAE for inputs like ``sample_ND`` (already normalized); see the module docstring."""
    sae = Sae(cfg)
    if cfg.architecture == "relu":
        sae.initialize(torch.Generator().manual_seed(seed), decoder_norm=RELU_DECODER_NORM)
    else:
        sae.initialize(torch.Generator().manual_seed(seed), encoder_scale=ENCODER_INIT_SCALE)
    with torch.no_grad():
        sae.b_dec.copy_(geometric_median(sample_ND))
    return sae


def init_transcoder(cfg: SaeConfig, target_sample_ND: torch.Tensor, seed: int, skip: bool = True) -> Transcoder:
    """A fresh transcoder: the SAE's random tied init, a zero skip path, b_dec at the target's mean."""
    tc = Transcoder(cfg, skip=skip)
    tc.initialize(torch.Generator().manual_seed(seed), encoder_scale=ENCODER_INIT_SCALE)
    with torch.no_grad():
        tc.b_dec.copy_(target_sample_ND.float().mean(0))
    return tc
