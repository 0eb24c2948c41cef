"""Optimizers beside Adam: schedule-free signum, and the swap to its evaluation weights.

Shape legend: F latents, D d_in.

Schedule-free SGD (Defazio et al. 2024, "The Road Less Scheduled", Algorithm 1) keeps
two sequences per parameter and evaluates gradients at an interpolation of them:

    y_t     = (1 - beta) z_t + beta x_t             (the parameters the model trains with)
    z_{t+1} = z_t - lr_t * sign(grad f(y_t))        (signum base step)
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1},  c_{t+1} = w_t / sum_{i<=t} w_i,  w_t = t^r lr_t^2

x is the running weighted average of the z iterates (r > 0 weights later ones more;
the paper's polynomial weighting) and is
the point to evaluate and export; no learning-rate decay is needed. The model's
parameters hold y during training; ``eval_weights`` swaps x in. A parameter group
with ``unit_rows=True`` keeps the rows of z on the unit sphere (an SAE decoder), so
x and y have rows of norm at most 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pipeline.sae.model import Sae


class ScheduleFreeSignum(torch.optim.Optimizer):
    """Schedule-free signum: per parameter z (the sign-descent iterate) and x (its weighted average) in state.

    ``lr`` may be changed between steps (a warm-up); the averaging weight c follows it.
    The group's step count k and running sum of weights are in the group (saved by ``state_dict``).
    """

    def __init__(self, params, lr: float, momentum: float = 0.95, average_power: float = 0.0):
        if not lr > 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum (the interpolation beta) must be in [0, 1), got {momentum}")
        if average_power < 0:
            raise ValueError(f"average_power must be >= 0, got {average_power}")
        defaults = dict(lr=lr, momentum=momentum, average_power=average_power, unit_rows=False, weight_sum=0.0, k=0)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ScheduleFreeSignum does not take a closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, beta = group["lr"], group["momentum"]
            group["k"] += 1
            w = group["k"] ** group["average_power"] * lr * lr
            group["weight_sum"] += w
            weight = w / group["weight_sum"]
            for p in params:
                if not self.state[p]:
                    self.state[p]["z"] = p.detach().clone()
                    self.state[p]["x"] = p.detach().clone()
            zs = [self.state[p]["z"] for p in params]
            xs = [self.state[p]["x"] for p in params]
            grads = [p.grad for p in params]
            torch._foreach_sign_(grads)  # in place: the gradients are spent after this step
            torch._foreach_add_(zs, grads, alpha=-lr)
            if group["unit_rows"]:
                for z in zs:
                    z.div_(z.norm(dim=-1, keepdim=True).clamp_min(1e-8))
            torch._foreach_lerp_(xs, zs, weight)
            for p, z, x in zip(params, zs, xs, strict=True):
                torch.lerp(z, x, beta, out=p)  # y = (1 - beta) z + beta x in one pass
        return None

    def eval_point(self, p: torch.Tensor) -> torch.Tensor:
        """The x sequence of parameter ``p`` (``p`` itself before the first step)."""
        state = self.state.get(p)
        return state["x"] if state else p


@contextmanager
def eval_weights(sae: Sae, optimizer: torch.optim.Optimizer) -> Iterator[Sae]:
    """``sae`` holding the weights to evaluate and export, restored to the training weights after.

    Adam: the parameters themselves. Schedule-free: the x sequence, with decoder rows
    renormalized to unit norm and each row's norm folded into its encoder row and
    bias, so every selected latent contributes exactly what it did before the fold.
    """
    if not isinstance(optimizer, ScheduleFreeSignum):
        yield sae
        return
    params = list(sae.parameters())
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.copy_(optimizer.eval_point(p))
            if sae.cfg.uses_unit_norm_decoder:
                norms_F = sae.W_dec.norm(dim=1).clamp_min(1e-8)
                sae.W_dec.div_(norms_F.unsqueeze(1))
                sae.W_enc_FD.mul_(norms_F.unsqueeze(1))
                sae.b_enc.mul_(norms_F)
                if sae.cfg.architecture == "jumprelu":
                    sae.log_threshold.add_(norms_F.log())
        yield sae
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
