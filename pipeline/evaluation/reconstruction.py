"""Reconstruction metrics with stated formulas, streamed in float64.

Shape legend: N tokens, D d_in, F latents.

    FVU                = sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mu||^2
    explained variance = 1 - FVU
    mu                 = mean of x over the *whole* evaluation set (not zero, not per token)
    L0                 = mean over tokens of the number of non-zero latents
    PCA baseline       = FVU of the best affine rank-r reconstruction of the same tokens,
                         r = round(L0): 1 - (top r eigenvalues) / (all eigenvalues) of the
                         covariance of x
    dead fraction      = fraction of latents with no activation over the stated tokens
    prefix m (matryoshka SAEs): FVU_m with x_hat_m = b_dec + the codes of latents < widths[m]
                         (same denominator), L0_m = mean active latents < widths[m]

``reconstruction_report`` also gives FVU and PCA baseline without outlier tokens
(norm above 10x the batch median): a residual stream's few massive activations
(SmolLM2 layer 15: ~0.03% of tokens, mostly the first after BOS, ~100x the
median norm) can hold most of its variance in one direction.

Sums are kept around a shift (the first batch's mean) so that the large mean
of residual streams does not cancel away the variance in floating point.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pipeline.sae.matryoshka import prefix_decode, prefix_l0
from pipeline.sae.model import Sae


@dataclass(frozen=True)
class ReconstructionMetrics:
    """Final numbers of a ``ReconstructionStats``."""

    n_tokens: int
    fvu: float
    explained_variance: float
    mse: float
    """Mean over tokens of ||x - x_hat||^2."""
    l0: float
    pca_rank: int
    pca_fvu: float
    """FVU of the best rank-``pca_rank`` affine reconstruction (PCA) of the same tokens."""
    dead_fraction: float
    """Latents that never fired on these tokens."""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class ReconstructionStats:
    """Accumulates x, x_hat and latent activity batch by batch; see the module docstring."""

    def __init__(self, d_in: int, d_sae: int):
        self.n = 0
        self.shift_D: torch.Tensor | None = None
        self.sum_D = torch.zeros(d_in, dtype=torch.float64)
        self.cov_DD = torch.zeros(d_in, d_in, dtype=torch.float64)
        self.squared_error = 0.0
        self.active = 0.0
        self.fired_F = torch.zeros(d_sae, dtype=torch.bool)

    def update(self, x_ND: torch.Tensor, x_hat_ND: torch.Tensor, active_N: torch.Tensor, fired_F: torch.Tensor) -> None:
        """Add a batch: inputs, reconstructions, active latents per token [N], latents that fired [F]."""
        x = x_ND.detach().to("cpu", torch.float64)
        if self.shift_D is None:
            self.shift_D = x.mean(0)
        centered = x - self.shift_D
        self.n += x.shape[0]
        self.sum_D += centered.sum(0)
        self.cov_DD += centered.T @ centered
        self.squared_error += (x - x_hat_ND.detach().to("cpu", torch.float64)).pow(2).sum().item()
        self.active += active_N.detach().to("cpu", torch.float64).sum().item()
        self.fired_F |= fired_F.detach().to("cpu")

    def centered_covariance(self) -> torch.Tensor:
        """sum_n (x_n - mu)(x_n - mu)^T  [D, D]."""
        offset = self.sum_D / self.n
        return self.cov_DD - self.n * torch.outer(offset, offset)

    def total_variance(self) -> float:
        """sum_n ||x_n - mu||^2."""
        return float(torch.trace(self.centered_covariance()))

    def pca_fvu(self, rank: int) -> float:
        eigenvalues = torch.linalg.eigvalsh(self.centered_covariance()).flip(0).clamp_min(0)
        total = eigenvalues.sum()
        return float(1 - eigenvalues[:rank].sum() / total) if total > 0 else 0.0

    def result(self) -> ReconstructionMetrics:
        if self.n == 0:
            raise ValueError("no evaluation tokens were seen")
        variance = self.total_variance()
        fvu = self.squared_error / variance if variance > 0 else float("nan")
        l0 = self.active / self.n
        rank = max(0, min(self.sum_D.numel(), round(l0)))
        return ReconstructionMetrics(
            n_tokens=self.n,
            fvu=fvu,
            explained_variance=1 - fvu,
            mse=self.squared_error / self.n,
            l0=l0,
            pca_rank=rank,
            pca_fvu=self.pca_fvu(rank),
            dead_fraction=1 - self.fired_F.float().mean().item(),
        )


class PrefixStats:
    """Squared error and active latents of each matryoshka prefix, from sparse codes."""

    def __init__(self, widths: tuple[int, ...]):
        self.widths = widths
        self.squared_error_M = torch.zeros(len(widths), dtype=torch.float64)
        self.active_M = torch.zeros(len(widths), dtype=torch.float64)

    def update(self, sae: Sae, x_ND: torch.Tensor, acts_NK: torch.Tensor, idx_NK: torch.Tensor) -> None:
        x_hat_NMD = prefix_decode(acts_NK, idx_NK, sae.W_dec, self.widths) + sae.b_dec
        error_NMD = (x_ND[:, None].double() - x_hat_NMD.double()).pow(2)
        self.squared_error_M += error_NMD.sum((0, 2)).cpu()
        self.active_M += prefix_l0(acts_NK, idx_NK, self.widths).sum(0).double().cpu()

    def result(self, total_variance: float, n_tokens: int) -> list[dict]:
        """Per prefix: {"width", "fvu", "l0"}; FVU uses the whole set's variance, as the SAE's own FVU does."""
        scale = 1 / total_variance if total_variance > 0 else float("nan")
        return [
            {"width": width, "fvu": float(error) * scale, "l0": float(active) / n_tokens}
            for width, error, active in zip(self.widths, self.squared_error_M, self.active_M, strict=True)
        ]


@torch.no_grad()
def reconstruction_report(sae: Sae, batches_ND: Iterable[torch.Tensor], outlier_ratio: float = 10.0) -> dict:
    """Metrics of ``sae`` on the given batches, overall and without outlier-norm tokens.

    A matryoshka SAE (its export keeps ``prefix_widths``) adds ``matryoshka_prefixes``:
    per prefix width its FVU and L0 (``PrefixStats``), over all tokens.
    """
    overall = ReconstructionStats(sae.cfg.d_in, sae.cfg.d_sae)
    prefixes = PrefixStats(sae.cfg.prefix_widths) if sae.cfg.prefix_widths else None
    typical = ReconstructionStats(sae.cfg.d_in, sae.cfg.d_sae)
    n_outliers = 0
    for x_ND in batches_ND:
        x_ND = x_ND.to(sae.W_dec.device, torch.float32)
        acts_NK, idx_NK = sae.encode_sparse(x_ND)
        x_hat_ND = sae.decode_sparse(acts_NK, idx_NK)
        active_N = (acts_NK > 0).sum(1)
        fired_F = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x_ND.device)
        fired_F[idx_NK[acts_NK > 0]] = True
        overall.update(x_ND, x_hat_ND, active_N, fired_F)
        if prefixes is not None:
            prefixes.update(sae, x_ND, acts_NK, idx_NK)
        norms_N = x_ND.norm(dim=1)
        ordinary_N = norms_N <= outlier_ratio * norms_N.median()
        n_outliers += int((~ordinary_N).sum())
        if ordinary_N.any():
            typical.update(x_ND[ordinary_N], x_hat_ND[ordinary_N], active_N[ordinary_N], fired_F)
    report = overall.result().as_dict()
    report["dead_fraction_heldout"] = report.pop("dead_fraction")
    typical_result = typical.result()
    report.update(
        outlier_tokens=n_outliers,
        fvu_without_outliers=typical_result.fvu,
        pca_fvu_without_outliers=typical_result.pca_fvu,
    )
    if prefixes is not None:
        report["matryoshka_prefixes"] = prefixes.result(overall.total_variance(), overall.n)
    return report
