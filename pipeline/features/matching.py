"""Compare two SAEs feature by feature: match decoder directions one-to-one, then compare what the pairs do.

Shape legend: A latents of SAE a, B latents of SAE b, S latents of the smaller side, L of the larger,
D d_in, N tokens, P matched pairs (P = S = min(A, B)), R rows of one block.

* Cosines are those of unit-normalized decoder rows, computed R rows at a time.
* ``match_decoders``: Hungarian matching (``scipy.optimize.linear_sum_assignment``) maximizing the
  summed cosine; every latent of the smaller side gets one partner. The solver needs the whole
  S x L cost matrix and works in float64 (it would copy anything else, and copy again a matrix
  with more rows than columns), so the matrix is filled block by block into one float64 buffer of
  that orientation, negated in place for the solver and restored: 8 * S * L bytes at the peak
  (2 GiB for 16k x 16k, 170 MiB for 4608 x 4608) plus one float32 block. The solver's time grows
  roughly cubically with the size (2-5 s at 4608 on a loaded 2-core CPU; not yet timed at 16k).
* PW-MCC is the mean cosine of the matched pairs. Its control is the same number against an
  untrained SAE of b's shape (``random_decoder``): in a space of D dimensions, matching thousands
  of random directions already finds pairs of clearly positive cosine, so PW-MCC means only what
  it adds above the control. The control's seed must differ from both SAEs' training seeds: an
  SAE's own initialization is no control (``mean_row_cosine`` measures how much of it a trained
  decoder kept; two SAEs trained from one seed share that much by construction).
* ``split_families``: a latent of the smaller SAE whose decoder has cosine >= 0.7 with at least two
  latents of the larger one (a feature the larger SAE split). Streamed block by block: never more
  than one R x L block in memory.
* ``PairCorrelation``: Pearson correlation over tokens of each matched pair's activations,
  accumulated batch by batch from centered sums of squares and cross products (float64 across batches).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pipeline.sae.model import Sae, SaeConfig

SPLIT_COSINE = 0.7
"""A latent of the larger SAE belongs to a split family at this decoder cosine with its parent, or more."""
BLOCK_ROWS = 2048
CONTROL_SEED = 123_456_789
"""Seed of the untrained control SAE: far from the small seeds SAEs are usually trained with."""


class Matching(NamedTuple):
    """A one-to-one matching of the latents of SAE a and SAE b, sorted by a's latent id."""

    idx_a_P: torch.Tensor
    """Latent ids in a (int64)."""
    idx_b_P: torch.Tensor
    """The matched latent ids in b (int64)."""
    cos_P: torch.Tensor
    """Decoder cosine of each pair (float32)."""

    @property
    def pw_mcc(self) -> float:
        """Mean cosine of the matched pairs."""
        return float(self.cos_P.double().mean()) if len(self.cos_P) else float("nan")

    def count_at_least(self, cosine: float) -> int:
        """How many pairs have a decoder cosine of at least ``cosine``."""
        return int((self.cos_P >= cosine).sum())


class SplitFamily(NamedTuple):
    """One latent of the smaller SAE and the latents of the larger one close to it."""

    parent: int
    """Latent id in the smaller SAE."""
    children: tuple[int, ...]
    """Latent ids in the larger SAE with cosine >= the threshold, most similar first."""
    cosines: tuple[float, ...]
    """Their decoder cosines with the parent."""


class Splits(NamedTuple):
    """The split families between two SAEs, largest family first."""

    parent_side: str
    """"a" when a is the smaller SAE (or both are the same size), else "b"."""
    families: list[SplitFamily]
    """Families with at least ``min_children`` children, largest first, then by parent id."""


def unit_rows(W_FD: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm, float32 (a zero row stays zero)."""
    W_FD = W_FD.detach().float()
    return W_FD / W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cosine_blocks(
    W_dec_SD: torch.Tensor, W_dec_LD: torch.Tensor, block_rows: int = BLOCK_ROWS
) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, cos_RL) for consecutive blocks of rows of the cosine matrix [S, L] (float32)."""
    if W_dec_SD.shape[1] != W_dec_LD.shape[1]:
        raise ValueError(f"decoders of different widths: d_in {W_dec_SD.shape[1]} and {W_dec_LD.shape[1]}")
    unit_SD, unit_LD = unit_rows(W_dec_SD), unit_rows(W_dec_LD)
    for start in range(0, unit_SD.shape[0], block_rows):
        yield start, unit_SD[start : start + block_rows] @ unit_LD.T


def decoder_cosines(
    W_dec_AD: torch.Tensor, W_dec_BD: torch.Tensor, block_rows: int = BLOCK_ROWS, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The full cosine matrix cos_AB of two decoders, filled block by block (CPU, ``dtype``)."""
    cos_AB = torch.empty(W_dec_AD.shape[0], W_dec_BD.shape[0], dtype=dtype)
    for start, cos_RB in cosine_blocks(W_dec_AD, W_dec_BD, block_rows):
        cos_AB[start : start + cos_RB.shape[0]] = cos_RB.cpu()
    return cos_AB


def _maximum_assignment(cos_SL: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the one-to-one assignment with the largest summed cosine (S <= L, float64)."""
    cost_SL = cos_SL.numpy()
    np.negative(cost_SL, out=cost_SL)  # in place: the solver minimizes, and a copy would double the peak
    try:
        return linear_sum_assignment(cost_SL)
    finally:
        np.negative(cost_SL, out=cost_SL)


def match_decoders(W_dec_AD: torch.Tensor, W_dec_BD: torch.Tensor, block_rows: int = BLOCK_ROWS) -> Matching:
    """Hungarian matching of a's and b's latents by decoder cosine (see the module docstring for memory)."""
    a_smaller = W_dec_AD.shape[0] <= W_dec_BD.shape[0]
    small_SD, large_LD = (W_dec_AD, W_dec_BD) if a_smaller else (W_dec_BD, W_dec_AD)
    cos_SL = decoder_cosines(small_SD, large_LD, block_rows, dtype=torch.float64)
    rows_P, cols_P = _maximum_assignment(cos_SL)
    rows_P, cols_P = torch.from_numpy(rows_P).long(), torch.from_numpy(cols_P).long()
    cos_P = cos_SL[rows_P, cols_P].float()
    del cos_SL
    idx_a_P, idx_b_P = (rows_P, cols_P) if a_smaller else (cols_P, rows_P)
    order_P = idx_a_P.argsort()
    return Matching(idx_a_P[order_P], idx_b_P[order_P], cos_P[order_P])


def random_decoder(cfg: SaeConfig, seed: int) -> torch.Tensor:
    """W_dec [F, D] of an untrained SAE of shape ``cfg``, drawn as saescope initializes one (seeded)."""
    return Sae(cfg).initialize(torch.Generator().manual_seed(seed)).W_dec.detach()


def mean_row_cosine(W_a_FD: torch.Tensor, W_b_FD: torch.Tensor) -> float:
    """Mean cosine of row i of one matrix with row i of the other (e.g. a decoder and its initialization)."""
    if W_a_FD.shape != W_b_FD.shape:
        raise ValueError(f"row-wise cosine needs equal shapes, got {tuple(W_a_FD.shape)} and {tuple(W_b_FD.shape)}")
    return float((unit_rows(W_a_FD) * unit_rows(W_b_FD)).sum(1).double().mean())


def control_pw_mcc(W_dec_AD: torch.Tensor, cfg_b: SaeConfig, seed: int = CONTROL_SEED) -> float:
    """PW-MCC of a against an untrained SAE of b's shape: what matching alone scores."""
    return match_decoders(W_dec_AD, random_decoder(cfg_b, seed)).pw_mcc


def split_families(
    W_dec_SD: torch.Tensor,
    W_dec_LD: torch.Tensor,
    threshold: float = SPLIT_COSINE,
    min_children: int = 2,
    block_rows: int = BLOCK_ROWS,
) -> list[SplitFamily]:
    """Latents of S with cosine >= ``threshold`` to at least ``min_children`` latents of L, largest first."""
    families = []
    for start, cos_RL in cosine_blocks(W_dec_SD, W_dec_LD, block_rows):
        close_RL = cos_RL >= threshold
        for row in torch.nonzero(close_RL.sum(1) >= min_children).flatten().tolist():
            children_C = torch.nonzero(close_RL[row]).flatten()
            cos_C = cos_RL[row, children_C]
            order_C = cos_C.argsort(descending=True)
            children, cosines = children_C[order_C].tolist(), cos_C[order_C].tolist()
            families.append(SplitFamily(start + row, tuple(children), tuple(cosines)))
    return sorted(families, key=lambda family: (-len(family.children), family.parent))


def splits_between(W_dec_AD: torch.Tensor, W_dec_BD: torch.Tensor, threshold: float = SPLIT_COSINE) -> Splits:
    """Split families with the smaller SAE (a when both are the same size) as the parents."""
    if W_dec_AD.shape[0] <= W_dec_BD.shape[0]:
        return Splits("a", split_families(W_dec_AD, W_dec_BD, threshold))
    return Splits("b", split_families(W_dec_BD, W_dec_AD, threshold))


class PairCorrelation:
    """Pearson correlation of P pairs of columns, streamed over batches of rows.

    Per batch: the column means, the centered sums of squares and the centered sum of cross
    products (in the batch's dtype, where centering keeps them accurate); batches are merged into
    float64 totals with the pairwise update of Chan, Golub and LeVeque. Nothing larger than one
    batch is kept.
    """

    def __init__(self, n_pairs: int):
        self.n_tokens = 0
        self._totals = torch.zeros(5, n_pairs, dtype=torch.float64)
        """Rows: mean u, mean v, centered sum u^2, centered sum v^2, centered sum u*v."""

    def update(self, u_NP: torch.Tensor, v_NP: torch.Tensor) -> None:
        """Add one batch: column p of ``u_NP`` and of ``v_NP`` are the two members of pair p."""
        if u_NP.shape != v_NP.shape or u_NP.ndim != 2 or u_NP.shape[1] != self._totals.shape[1]:
            raise ValueError(f"expected two [N, {self._totals.shape[1]}] batches, got {tuple(u_NP.shape)} and "
                             f"{tuple(v_NP.shape)}")  # fmt: skip
        n_new, n_old = u_NP.shape[0], self.n_tokens
        if n_new == 0:
            return
        mean_u, mean_v = u_NP.mean(0), v_NP.mean(0)
        du_NP, dv_NP = u_NP - mean_u, v_NP - mean_v
        batch = torch.stack([mean_u, mean_v, (du_NP * du_NP).sum(0), (dv_NP * dv_NP).sum(0), (du_NP * dv_NP).sum(0)])
        batch = batch.double().cpu()
        n = n_old + n_new
        delta_u, delta_v = batch[0] - self._totals[0], batch[1] - self._totals[1]
        weight = n_old * n_new / n
        self._totals[0] += delta_u * n_new / n
        self._totals[1] += delta_v * n_new / n
        self._totals[2] += batch[2] + delta_u * delta_u * weight
        self._totals[3] += batch[3] + delta_v * delta_v * weight
        self._totals[4] += batch[4] + delta_u * delta_v * weight
        self.n_tokens = n

    def result(self) -> torch.Tensor:
        """corr_P (float64); NaN where either member of the pair is constant (e.g. never fired)."""
        mean_u, mean_v, ss_u, ss_v, cross = self._totals
        n = self.n_tokens
        varies = (ss_u > 1e-9 * n * mean_u * mean_u) & (ss_v > 1e-9 * n * mean_v * mean_v) & (ss_u > 0) & (ss_v > 0)
        corr = cross / (ss_u * ss_v).sqrt()
        return torch.where(varies, corr, torch.full_like(corr, float("nan"))).clamp(-1, 1)


def matched_correlation(
    sae_a: Sae, sae_b: Sae, matching: Matching, batches: Iterable[torch.Tensor], max_tokens: int
) -> tuple[torch.Tensor, int]:
    """(corr_P, tokens used): correlation over tokens of each matched pair's activations.

    ``batches`` yields activations [N, D] on the SAEs' device; at most ``max_tokens`` are used.
    Each batch is encoded densely ([N, A] and [N, B]) and only the matched columns are kept.
    """
    device = sae_a.W_dec.device
    idx_a_P, idx_b_P = matching.idx_a_P.to(device), matching.idx_b_P.to(device)
    acc = PairCorrelation(len(idx_a_P))
    with torch.inference_mode():
        for x_ND in batches:
            x_ND = x_ND[: max_tokens - acc.n_tokens].float()
            if x_ND.shape[0] == 0:
                break
            acc.update(sae_a.encode(x_ND)[:, idx_a_P], sae_b.encode(x_ND)[:, idx_b_P])
            if acc.n_tokens >= max_tokens:
                break
    return acc.result(), acc.n_tokens
