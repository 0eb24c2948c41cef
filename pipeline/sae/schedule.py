"""Learning-rate and penalty schedules, as pure functions of the step."""

from __future__ import annotations

import math


def default_lr(d_sae: int) -> float:
    """2e-4 / sqrt(d_sae / 2^14): the width scaling of Gao et al. (2024), as in sparsify."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def auto_lr(d_sae: int, steps: int) -> float:
    """``default_lr`` raised for short runs, where it barely moves the weights: x sqrt(10k / steps), at most 8x."""
    return default_lr(d_sae) * min(8.0, max(1.0, 10_000 / steps) ** 0.5)


def signum_sf_lr(d_sae: int) -> float:
    """Schedule-free signum's step: 2.5e-3 / sqrt(d_sae / 2^14), the same width scaling as ``default_lr``.

    Measured on SmolLM2 layer 15 (d_sae 4608, k 32, one pass over 184k tokens): 4.7e-3 (this)
    reached held-out FVU 0.083-0.085, 9.4e-3 0.10 and less stable (bench/train_throughput.py).
    """
    return 2.5e-3 / math.sqrt(d_sae / 2**14)


def auto_lr_for(optimizer: str, d_sae: int, steps: int) -> float:
    """The learning rate "auto" resolves to: ``auto_lr`` for Adam, ``signum_sf_lr`` for schedule-free signum."""
    return signum_sf_lr(d_sae) if optimizer == "signum-sf" else auto_lr(d_sae, steps)


def default_warmup_steps(steps: int) -> int:
    """Learning-rate warm-up: 5% of the steps, at least 1, at most 1000."""
    return min(1000, max(1, steps // 20))


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warm-up over ``warmup_steps``, constant, then linear decay to 0 over the last fraction."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = int(total_steps * decay_fraction)
    decay_start = total_steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        return base_lr * max(0.0, (total_steps - step) / decay_steps)
    return base_lr


def linear_warmup(step: int, warmup_steps: int, final_value: float) -> float:
    """Ramp a coefficient from 0 to ``final_value`` over ``warmup_steps``."""
    if warmup_steps <= 0:
        return final_value
    return final_value * min(1.0, (step + 1) / warmup_steps)
