"""Activations at one or several hook points for a block of contexts, computed batch by batch.

Shape legend: C contexts, T positions, D d_model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pipeline.lm.hook_points import HookPoint, as_hook_point, capture


@torch.inference_mode()
def compute_activations(
    model: nn.Module,
    tokens_CT: torch.Tensor,
    point: HookPoint | int,
    batch_size: int,
    out_dtype: torch.dtype = torch.float32,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Activations at ``point`` for every context, on CPU in ``out_dtype`` [C, T, D].

    ``point`` is a HookPoint, or a block index meaning the residual stream after it.
    ``compute_point_activations`` with one point; see there.
    """
    point = as_hook_point(point)
    return compute_point_activations(model, tokens_CT, [point], batch_size, out_dtype, on_batch)[point]


@torch.inference_mode()
def compute_point_activations(
    model: nn.Module,
    tokens_CT: torch.Tensor,
    points: Sequence[HookPoint],
    batch_size: int,
    out_dtype: torch.dtype = torch.float32,
    on_batch: Callable[[int], None] | None = None,
) -> dict[HookPoint, torch.Tensor]:
    """Activations at every point of ``points`` for every context, on CPU in ``out_dtype`` {point: [C, T, D]}.

    One forward per batch serves every point and stops after the deepest point's
    block (``capture``). Batches are always cut at the same offsets for the same
    inputs, so the same contexts give bit-identical activations on the same machine,
    whichever other points are captured alongside. ``on_batch`` is called with the
    number of tokens after each batch (for progress bars). On a GPU each batch is
    cast there and copied into pinned host buffers without blocking, so the next
    batch's forward is queued while the copy runs; the single synchronize is at the end.
    """
    device = next(model.parameters()).device
    outputs: dict[HookPoint, list[torch.Tensor]] = {point: [] for point in points}
    pinned: dict[HookPoint, torch.Tensor] = {}
    for start in range(0, tokens_CT.shape[0], batch_size):
        ids_BT = tokens_CT[start : start + batch_size].to(device=device, dtype=torch.long)
        captured = capture(model, ids_BT, points)
        for point in points:
            acts_BTD = captured[point].to(out_dtype)
            if device.type == "cuda":
                if point not in pinned:
                    shape = (tokens_CT.shape[0], *acts_BTD.shape[1:])
                    pinned[point] = torch.empty(shape, dtype=out_dtype, pin_memory=True)
                pinned[point][start : start + ids_BT.shape[0]].copy_(acts_BTD, non_blocking=True)
            else:
                outputs[point].append(acts_BTD)
        if on_batch is not None:
            on_batch(ids_BT.numel())
    if pinned:
        torch.cuda.synchronize(device)
        return pinned
    return {point: torch.cat(chunks) for point, chunks in outputs.items()}


@torch.inference_mode()
def mlp_io(
    model: nn.Module, ids_BT: torch.Tensor, layers: tuple[int, ...], ordinary_BT: torch.Tensor
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (MLP input, MLP output) at the ordinary positions, float32 [N, D] each, from one forward."""
    points = [HookPoint(layer, kind) for layer in layers for kind in ("mlp-in", "mlp-out")]
    acts = capture(model, ids_BT, points)
    return {
        layer: (
            acts[HookPoint(layer, "mlp-in")][ordinary_BT].float(),
            acts[HookPoint(layer, "mlp-out")][ordinary_BT].float(),
        )
        for layer in layers
    }


@torch.no_grad()
def mlp_io_stacked(
    model: nn.Module,
    ids_BT: torch.Tensor,
    layers: tuple[int, ...],
    ordinary_BT: torch.Tensor,
    scales: Sequence[tuple[float, float]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mlp_io`` for every layer at once: (inputs x s_in, outputs x s_out), float32 [L, N, D] each.

    The same values as ``mlp_io`` times each layer's (input, output) scale, written
    straight into two stacked buffers (no per-layer float copies to stack afterwards).
    Ordinary tensors, not inference ones: autograd may save them for backward.
    """
    points = [HookPoint(layer, kind) for layer in layers for kind in ("mlp-in", "mlp-out")]
    acts = capture(model, ids_BT, points)
    rows_N = ordinary_BT.reshape(-1).nonzero().squeeze(1)
    d = acts[points[0]].shape[-1]
    x_LND = torch.empty(len(layers), rows_N.numel(), d, device=ids_BT.device)
    y_LND = torch.empty_like(x_LND)
    for i, layer in enumerate(layers):
        for kind, out_LND, scale in (("mlp-in", x_LND, scales[i][0]), ("mlp-out", y_LND, scales[i][1])):
            out_LND[i].copy_(acts[HookPoint(layer, kind)].reshape(-1, d).index_select(0, rows_N))
            out_LND[i].mul_(scale)
    return x_LND, y_LND
