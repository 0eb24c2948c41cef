"""Intervene on transcoder features at chosen positions and see what the model predicts and writes.

Shape legend: B batch, T positions, D d_model, F latents, V vocabulary, K top-k, N edited positions.

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

Cross-layer transcoders. ``transcoders`` may hold the layer views of a CLT
(``CrossLayerTranscoder.layer_view``): a feature of source layer l writes into the MLP
outputs of l..L-1, so its edit adds

    (v - a_f(t)) * W_dec[l][f, l' - l]

to the MLP output of every layer l' >= l at position t, with a_f(t) read once, from
layer l's MLP input of the same forward pass (the coefficient is fixed there; what
it changes downstream does not feed back into it). Equivalently, each MLP output
becomes the CLT's reconstruction with a_f(t) set to v plus the live reconstruction
error (MLP output minus the unedited reconstruction). A per-layer transcoder is the
case L - l = 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.lm.hook_points import replace_mlp_out
from pipeline.lm.hooks import decoder_blocks
from pipeline.sae.cross_layer import CltLayer
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


def check_edits(edits: Sequence[FeatureEdit], transcoders: dict[int, Transcoder | CltLayer], prompt_len: int) -> None:
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


def output_decoders(tc: Transcoder | CltLayer, layer: int) -> dict[int, torch.Tensor]:
    """Output layer -> [F, D]: where the features of ``tc`` (layer ``layer``'s) write (a CLT view: l..L-1)."""
    if isinstance(tc, CltLayer):
        return {out: tc.clt.decoder(layer)[:, out - layer] for out in tc.output_layers}
    return {layer: tc.W_dec}


def compute_dtype(tc: Transcoder | CltLayer) -> torch.dtype:
    """float32, or float64 for a float64 transcoder."""
    return torch.promote_types(torch.float32, tc.W_dec.dtype)


@dataclass(frozen=True)
class EditCoefficient:
    """One edit's (v - a_f(t)) where it applies, read at its source layer's MLP input."""

    at_BT: torch.Tensor
    """Where the edit applies (bool)."""
    coef_N: torch.Tensor
    """v - a_f(t) at each of those positions."""


@torch.no_grad()
def edit_coefficients(
    tc: Transcoder | CltLayer, x_BTD: torch.Tensor, positions_BT: torch.Tensor, edits: Sequence[FeatureEdit]
) -> list[EditCoefficient | None]:
    """Per edit (one source layer's), its coefficients from the MLP input ``x_BTD``; None where no position matches."""
    dtype = compute_dtype(tc)
    coefs: list[EditCoefficient | None] = []
    for edit in edits:
        at_BT = (
            torch.ones_like(positions_BT, dtype=torch.bool) if edit.position is None else positions_BT == edit.position
        )
        if not bool(at_BT.any()):
            coefs.append(None)
            continue
        acts_N = tc.encode(x_BTD[at_BT].to(dtype))[:, edit.feature]
        coefs.append(EditCoefficient(at_BT, edit.value - acts_N))
    return coefs


@torch.no_grad()
def _delta(like_BTD: torch.Tensor, writes, dtype: torch.dtype) -> torch.Tensor:
    """Sum of coef * W_FD[feature] over (edit, coefficient, W_FD) triples, at each edit's positions."""
    delta_BTD = torch.zeros(like_BTD.shape, dtype=dtype, device=like_BTD.device)
    for edit, coef, W_FD in writes:
        if coef is not None:
            delta_BTD[coef.at_BT] += coef.coef_N.unsqueeze(-1).to(dtype) * W_FD[edit.feature].to(dtype)
    return delta_BTD


@contextmanager
def intervene(
    model: nn.Module,
    transcoders: dict[int, Transcoder | CltLayer],
    edits: Sequence[FeatureEdit],
    on_edit: Callable[[int, torch.Tensor], None] | None = None,
) -> Iterator[None]:
    """Attach the edits to the MLPs they write into for the duration of the block; hooks always removed.

    ``on_edit(layer, delta_BTD)`` is called after every edited MLP forward (for tests).
    """
    blocks = decoder_blocks(model)
    by_source: dict[int, list[FeatureEdit]] = {}
    for edit in edits:
        by_source.setdefault(edit.layer, []).append(edit)
    decoders = {source: output_decoders(transcoders[source], source) for source in by_source}
    outputs = sorted({out for per_out in decoders.values() for out in per_out})
    plan = _Plan(transcoders, by_source, decoders, {})
    with ExitStack() as stack:
        for layer in outputs:
            _attach(stack, model, blocks[layer], layer, plan, on_edit)
        yield


@dataclass(frozen=True)
class _Plan:
    """The edits of one ``intervene`` block; ``coefs`` holds each source layer's coefficients of the current forward
    (set by the source layer's hook, read by its output layers' hooks later in the same forward)."""

    transcoders: dict
    by_source: dict[int, list[FeatureEdit]]
    decoders: dict[int, dict[int, torch.Tensor]]
    coefs: dict[int, list[EditCoefficient | None]]

    def delta(self, layer: int, x_BTD: torch.Tensor, positions_BT: torch.Tensor) -> torch.Tensor:
        """What to add to MLP ``layer``'s output: first read the coefficients of edits at this layer, then sum the
        writes of every edited source layer that decodes into it."""
        if layer in self.by_source:
            tc = self.transcoders[layer]
            self.coefs[layer] = edit_coefficients(tc, x_BTD, positions_BT, self.by_source[layer])
        writes, dtypes = [], [torch.float32]
        for source, per_out in self.decoders.items():
            if source <= layer and layer in per_out:
                dtypes.append(compute_dtype(self.transcoders[source]))
                edits, coefs = self.by_source[source], self.coefs[source]
                writes += [(edit, c, per_out[layer]) for edit, c in zip(edits, coefs, strict=True)]
        return _delta(x_BTD, writes, torch.float64 if torch.float64 in dtypes else torch.float32)


def _attach(stack: ExitStack, model: nn.Module, block: nn.Module, layer: int, plan: _Plan, on_edit) -> None:
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
        delta_BTD = plan.delta(layer, x_BTD, positions_BT)
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
    transcoders: dict[int, Transcoder | CltLayer],
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
