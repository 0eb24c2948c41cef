"""Top activating examples of one transcoder latent over token contexts, computed live from the model.

Shape legend: C contexts, T positions, B contexts in a batch, D d_model, F latents, M active entries.

A transcoder of layer L reads that layer's MLP input (``mlp-in``), so its codes
need only the forward up to block L (``capture`` stops there). ``layer_codes``
runs the model over the contexts batch by batch and keeps every active code of
every latent at the ordinary (non-special) positions as a flat sparse list;
``latent_examples`` then reads one latent out of it in milliseconds: its
activation per token, its density and max/mean (when active) over the ordinary
tokens, and its top contexts by peak activation (at most one example per
context, at its earliest peak; ties go to the smaller context id), each a window
of tokens around the peak. ``interval_examples`` shows it across its range: windows
around tokens from equal-count slices of its active values, as SAE feature pages
show interval examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.lm.hook_points import HookPoint, capture
from pipeline.sae.transcoder import Transcoder


@dataclass(frozen=True)
class LayerCodes:
    """Every active code of one transcoder over C x T tokens, as a flat sparse list."""

    token_M: torch.Tensor
    """Flat token index (context * T + position) per entry [M] int64."""
    latent_M: torch.Tensor
    """Latent id per entry [M] int64."""
    value_M: torch.Tensor
    """Activation per entry [M] float32 (> 0)."""
    ordinary_CT: torch.Tensor
    """True where a position holds an ordinary token [C, T] bool (special positions have no codes)."""

    @property
    def n_tokens(self) -> int:
        return int(self.ordinary_CT.sum())


@dataclass(frozen=True)
class LatentExample:
    """One context's window around the latent's peak."""

    context: int
    """Index of the context in the ``tokens_CT`` the codes came from."""
    start: int
    """First position of the window."""
    peak: int
    """Position of the peak, in the context (``peak - start`` in the window)."""
    activation: float
    """The latent's activation at the peak."""
    acts: list[float]
    """The latent's activation at each position of the window."""


@dataclass(frozen=True)
class LatentExamples:
    latent: int
    n_tokens: int
    """Ordinary tokens looked at."""
    n_active: int
    """Tokens where the latent is active (> 0)."""
    max_act: float
    mean_act: float
    """Mean activation over the tokens where it is active (0 when it never is)."""
    examples: list[LatentExample]
    """Top contexts by peak activation, highest first."""

    @property
    def density(self) -> float:
        return self.n_active / self.n_tokens if self.n_tokens else 0.0


@torch.inference_mode()
def layer_codes(
    model: nn.Module,
    transcoder: Transcoder,
    tokens_CT: torch.Tensor,
    layer: int,
    ordinary_CT: torch.Tensor,
    batch_contexts: int = 8,
    on_batch: Callable[[int], None] | None = None,
) -> LayerCodes:
    """The transcoder's codes on layer ``layer``'s MLP input for every ordinary token of ``tokens_CT``.

    ``on_batch`` is called with the number of contexts done after each batch (for progress).
    """
    if batch_contexts < 1:
        raise ValueError(f"batch_contexts must be positive, got {batch_contexts}")
    device = next(model.parameters()).device
    n_ctx, ctx_len = tokens_CT.shape
    point = HookPoint(layer, "mlp-in")
    tokens, latents, values = [], [], []
    for start in range(0, n_ctx, batch_contexts):
        ids_BT = tokens_CT[start : start + batch_contexts].to(device=device, dtype=torch.long)
        ordinary_BT = ordinary_CT[start : start + batch_contexts].to(device)
        x_ND = capture(model, ids_BT, [point])[point][ordinary_BT].float()
        acts_NK, idx_NK = transcoder.encode_sparse(x_ND)
        flat_N = ordinary_BT.reshape(-1).nonzero()[:, 0] + start * ctx_len
        keep_NK = acts_NK > 0
        tokens.append(flat_N.unsqueeze(1).expand_as(idx_NK)[keep_NK].cpu())
        latents.append(idx_NK[keep_NK].long().cpu())
        values.append(acts_NK[keep_NK].float().cpu())
        if on_batch is not None:
            on_batch(min(n_ctx, start + batch_contexts))
    empty = torch.zeros(0, dtype=torch.long)
    return LayerCodes(
        torch.cat(tokens) if tokens else empty,
        torch.cat(latents) if latents else empty,
        torch.cat(values) if values else torch.zeros(0),
        ordinary_CT.bool().cpu(),
    )


def latent_acts(codes: LayerCodes, latent: int) -> torch.Tensor:
    """The latent's activation at every token [C, T] float32 (0 where inactive or special)."""
    acts_CT = torch.zeros(codes.ordinary_CT.shape, dtype=torch.float32)
    mine = codes.latent_M == latent
    acts_CT.view(-1)[codes.token_M[mine]] = codes.value_M[mine]
    return acts_CT


def latent_examples(codes: LayerCodes, latent: int, top_n: int = 10, window: int = 16) -> LatentExamples:
    """Statistics and the ``top_n`` best contexts of one latent, each ``window`` tokens either side of its peak."""
    acts_CT = latent_acts(codes, latent)
    active_CT = acts_CT > 0
    n_active = int(active_CT.sum())
    peak_C, where_C = _earliest_max(acts_CT)
    # Highest peak first, the smaller context id on ties (a stable sort over context order).
    order = torch.argsort(-peak_C, stable=True)
    chosen = [int(c) for c in order[:top_n] if peak_C[c] > 0]
    ctx_len = acts_CT.shape[1]
    examples = []
    for context in chosen:
        peak = int(where_C[context])
        start, stop = max(0, peak - window), min(ctx_len, peak + window + 1)
        examples.append(
            LatentExample(context, start, peak, float(peak_C[context]), acts_CT[context, start:stop].tolist())
        )
    return LatentExamples(
        latent=latent,
        n_tokens=codes.n_tokens,
        n_active=n_active,
        max_act=float(acts_CT.max()) if acts_CT.numel() else 0.0,
        mean_act=float(acts_CT[active_CT].mean()) if n_active else 0.0,
        examples=examples,
    )


def _earliest_max(acts_CT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(peak value [C], its earliest position [C]) per context."""
    peak_C = acts_CT.max(dim=1).values
    is_peak_CT = acts_CT == peak_C.unsqueeze(1)
    positions_T = torch.arange(acts_CT.shape[1])
    where_C = torch.where(is_peak_CT, positions_T, acts_CT.shape[1]).min(dim=1).values
    return peak_C, where_C


@dataclass(frozen=True)
class IntervalBin:
    """Tokens whose activation falls in (``low``, ``high``]: one equal-count slice of the active tokens."""

    low: float
    high: float
    n_tokens: int
    examples: list[LatentExample]
    """Windows around tokens spread evenly over the bin's ranks, lowest activation first."""


def interval_examples(
    codes: LayerCodes, latent: int, n_bins: int = 5, per_bin: int = 3, window: int = 8
) -> list[IntervalBin]:
    """Examples from ``n_bins`` equal-count activation ranges of one latent (lowest range first).

    The active tokens are sorted by activation (ties by token order) and cut into
    ``n_bins`` runs of as equal length as possible (fewer bins when fewer tokens are
    active); each bin shows ``per_bin`` tokens at evenly spaced ranks within it, each
    as a window of ``window`` tokens either side. Deterministic for the same codes.
    """
    acts_CT = latent_acts(codes, latent)
    flat = acts_CT.reshape(-1)
    active_N = (flat > 0).nonzero()[:, 0]
    if active_N.numel() == 0:
        return []
    order = active_N[torch.argsort(flat[active_N], stable=True)]
    ctx_len = acts_CT.shape[1]
    bins, done = [], 0
    for part in torch.tensor_split(order, min(n_bins, order.numel())):
        picks = torch.linspace(0, part.numel() - 1, min(per_bin, part.numel())).round().long()
        examples = [_window(acts_CT, int(part[i]) // ctx_len, int(part[i]) % ctx_len, window) for i in picks]
        low = float(flat[order[done - 1]]) if done else 0.0
        bins.append(IntervalBin(low, float(flat[part[-1]]), int(part.numel()), examples))
        done += part.numel()
    return bins


def _window(acts_CT: torch.Tensor, context: int, position: int, window: int) -> LatentExample:
    start, stop = max(0, position - window), min(acts_CT.shape[1], position + window + 1)
    value = float(acts_CT[context, position])
    return LatentExample(context, start, position, value, acts_CT[context, start:stop].tolist())
