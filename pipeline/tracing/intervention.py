"""Intervene on transcoder features at chosen positions and see what the model predicts and writes.

Shape legend: B batch, T positions, D d_model, F latents, V vocabulary, K top-k.

Semantics. For an edit (feature f of layer L's transcoder, position t, value v),
a forward hook on layer L's MLP adds

    (v - a_f(t)) * W_dec[f]

to the MLP's output at absolute position t, where a_f(t) is the transcoder's
activation of f recomputed on the MLP input the hook sees in this forward pass.
So an edit upstream changes the MLP inputs downstream, and a downstream a_f(t)
is read from the changed input: interventions propagate. Ablate is v = 0; clamp
is any other v (v = a_f(t) changes nothing). Other positions are untouched, and
so are tokens generated after the prompt (positions >= the prompt's length are
never named by an edit, unless the edit's position is None: then it acts at
every position, prompt and generated alike, which is steering with one latent).
Positions are read from the block's
``position_ids``, so single-token decode steps under a KV cache are placed
correctly; models that pass none fall back to a running count.

Several edits at one layer read every a_f(t) from the same unedited MLP input.
The transcoder's reconstruction error is kept: the MLP itself still runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.lm.hook_points import replace_mlp_out
from pipeline.lm.hooks import decoder_blocks
from pipeline.sae.transcoder import Transcoder
from pipeline.steering.generation import SamplingConfig, sample


@dataclass(frozen=True)
class FeatureEdit:
    """Set feature ``feature`` of layer ``layer``'s transcoder to ``value`` at absolute position ``position``."""

    layer: int
    position: int | None
    """Absolute position; None for every position, generated ones included."""
    feature: int
    value: float = 0.0
    """0 ablates; any other value clamps."""


def check_edits(edits: Sequence[FeatureEdit], transcoders: dict[int, Transcoder], prompt_len: int) -> None:
    """ValueError naming the first edit whose layer, feature or position does not exist."""
    if not edits:
        raise ValueError("choose at least one feature node to intervene on")
    for edit in edits:
        if edit.layer not in transcoders:
            raise ValueError(f"no transcoder at layer {edit.layer}: loaded layers are {sorted(transcoders)}")
        d_sae = transcoders[edit.layer].cfg.d_sae
        if not 0 <= edit.feature < d_sae:
            raise ValueError(f"feature {edit.feature} out of range: layer {edit.layer} has {d_sae} (0-{d_sae - 1})")
        if edit.position is not None and not 0 <= edit.position < prompt_len:
            raise ValueError(f"position {edit.position} out of range: the prompt has {prompt_len} tokens")


@torch.no_grad()
def edit_delta(tc: Transcoder, x_BTD: torch.Tensor, positions_BT: torch.Tensor, edits: Sequence[FeatureEdit]):
    """What to add to the MLP output [B, T, D] for ``edits`` (one layer's), given the MLP input ``x_BTD``."""
    delta_BTD = torch.zeros(x_BTD.shape, dtype=torch.float32, device=x_BTD.device)
    for edit in edits:
        at_BT = (
            torch.ones_like(positions_BT, dtype=torch.bool) if edit.position is None else positions_BT == edit.position
        )
        if not bool(at_BT.any()):
            continue
        acts_N = tc.encode(x_BTD[at_BT].float())[:, edit.feature]
        coef_N = edit.value - acts_N
        delta_BTD[at_BT] += coef_N.unsqueeze(-1) * tc.W_dec[edit.feature].float()
    return delta_BTD


@contextmanager
def intervene(
    model: nn.Module,
    transcoders: dict[int, Transcoder],
    edits: Sequence[FeatureEdit],
    on_edit: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[None]:
    """Attach the edits to the MLPs of their layers for the duration of the block; hooks always removed.

    ``on_edit(layer, delta_BTD)`` is called after every edited MLP forward (for tests).
    """
    blocks = decoder_blocks(model)
    by_layer: dict[int, list[FeatureEdit]] = {}
    for edit in edits:
        by_layer.setdefault(edit.layer, []).append(edit)
    with ExitStack() as stack:
        for layer, layer_edits in by_layer.items():
            _attach(stack, model, blocks[layer], transcoders[layer], layer, layer_edits, on_edit)
        yield


def _attach(stack: ExitStack, model: nn.Module, block: nn.Module, tc: Transcoder, layer: int, edits, on_edit) -> None:
    """Hooks on one block: read its positions, then edit its MLP's output."""
    state: dict = {"positions": None, "seen": 0}

    def read_positions(_module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        length = hidden.shape[1]
        given = kwargs.get("position_ids")
        start = state["seen"]
        state["seen"] += length
        state["positions"] = given if given is not None else torch.arange(start, start + length).unsqueeze(0)

    def edit_output(x_BTD: torch.Tensor, out_BTD: torch.Tensor) -> torch.Tensor:
        positions_BT = state["positions"].to(out_BTD.device).expand(out_BTD.shape[0], out_BTD.shape[1])
        delta_BTD = edit_delta(tc, x_BTD, positions_BT, edits)
        if on_edit is not None:
            on_edit(layer, delta_BTD)
        return out_BTD + delta_BTD.to(out_BTD.dtype)

    stack.callback(block.register_forward_pre_hook(read_positions, with_kwargs=True).remove)
    stack.enter_context(replace_mlp_out(model, layer, edit_output))


@torch.inference_mode()
def last_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """The model's logits for the token after ``ids`` [V] (no cache)."""
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1].float().cpu()


def top_tokens(logits_V: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely next tokens as (id, probability), most likely first."""
    probs_V = torch.softmax(logits_V.float(), dim=-1)
    values_K, ids_K = probs_V.topk(min(k, probs_V.numel()))
    return [(int(i), float(p)) for i, p in zip(ids_K, values_K, strict=True)]


@dataclass(frozen=True)
class InterventionResult:
    """The model's next-token prediction and greedy continuation without and with the edits."""

    original_top: list[tuple[int, float]]
    """(token id, probability) of the most likely next tokens, unedited."""
    edited_top: list[tuple[int, float]]
    """The same with the edits attached."""
    original_ids: list[int]
    """Greedy continuation, unedited."""
    edited_ids: list[int]
    """Greedy continuation with the edits attached (on prompt positions, or everywhere for position None)."""


def run_intervention(
    model: nn.Module,
    transcoders: dict[int, Transcoder],
    edits: Sequence[FeatureEdit],
    prompt_ids: list[int],
    k: int = 10,
    max_new_tokens: int = 20,
    eos_id: int | None = None,
) -> InterventionResult:
    """Top-k next tokens and a greedy continuation of ``prompt_ids``, without and with ``edits``."""
    check_edits(edits, transcoders, len(prompt_ids))
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    original_top = top_tokens(last_logits(model, prompt_ids), k)
    original_ids = sample(model, prompt_ids, greedy, eos_id)
    with intervene(model, transcoders, edits):
        edited_top = top_tokens(last_logits(model, prompt_ids), k)
    with intervene(model, transcoders, edits):
        edited_ids = sample(model, prompt_ids, greedy, eos_id)
    return InterventionResult(original_top, edited_top, original_ids, edited_ids)
