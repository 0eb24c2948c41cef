"""The residual stream after a decoder block: find blocks, hook them, run only what is needed.

Shape legend: B batch, T positions, D d_model.

``residual_after_block`` runs the model's base (no LM head) and stops right
after block ``layer`` by raising from a forward hook, so later blocks never run.
Its output equals ``output_hidden_states[layer + 1]`` of the full model for
every block but the last (HF applies the final norm to the last entry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def hook_name(layer: int) -> str:
    """TransformerLens/SAELens name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (the shallowest ModuleList of n_layers modules)."""
    n_layers = int(model.config.num_hidden_layers)
    candidates = [
        (name.count("."), name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers
    ]
    if not candidates:
        raise ValueError(f"cannot find the {n_layers} decoder blocks of {type(model).__name__}")
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def check_layer(layer: int, n_layers: int) -> int:
    """Return layer if 0 <= layer < n_layers, else raise a ValueError naming the valid range."""
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: model has {n_layers} layers (0-{n_layers - 1})")
    return layer


def block_output(output) -> torch.Tensor:
    """The hidden states inside a block's output (a tensor, or a tuple led by one)."""
    return output[0] if isinstance(output, tuple) else output


def replace_block_output(output, hidden_BTD: torch.Tensor):
    """A block output of the same structure with its hidden states replaced."""
    if isinstance(output, tuple):
        return (hidden_BTD, *output[1:])
    return hidden_BTD


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once the wanted block has run."""


@contextmanager
def block_hook(model: nn.Module, layer: int, hook: Callable) -> Iterator[None]:
    """Attach a forward hook to block ``layer`` for the duration of the block; always removed."""
    block = decoder_blocks(model)[check_layer(layer, int(model.config.num_hidden_layers))]
    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def residual_after_block(
    model: nn.Module,
    input_ids_BT: torch.Tensor,
    layer: int,
    attention_mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Residual stream after block ``layer`` [B, T, D]; blocks after ``layer`` and the head never run."""
    captured: list[torch.Tensor] = []

    def capture_and_stop(_module, _inputs, output):
        captured.append(block_output(output))
        raise _StopForward

    with block_hook(model, layer, capture_and_stop):
        try:
            model.base_model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False)
        except _StopForward:
            pass
    if not captured:
        raise RuntimeError(f"block {layer} did not run during the forward pass")
    return captured[0]
