"""Held-out metrics of a transcoder set: per-layer FVU of the MLP output, and LM loss with MLPs replaced.

Per layer: FVU of the MLP output against its held-out mean, L0, the fraction of
latents that never fired on the held-out tokens, and CE-loss recovered and KL with
that layer's MLP alone replaced (on the first ``PER_LAYER_LM_CONTEXTS`` held-out
contexts, to bound the cost: three forwards per layer). Then the same with every
layer of the set replaced at once, on ``lm_contexts`` contexts.
"""

from __future__ import annotations

import torch
from torch import nn

from jobs.console import progress
from pipeline.evaluation.mlp_splice import mlp_splice_metrics
from pipeline.evaluation.reconstruction import ReconstructionStats
from pipeline.lm.activations import mlp_io
from pipeline.lm.packing import special_mask
from pipeline.sae.transcoder import Transcoder

PER_LAYER_LM_CONTEXTS = 8
EVAL_CONTEXTS_PER_FORWARD = 8


@torch.no_grad()
def reconstruction_by_layer(model: nn.Module, tcs: dict[int, Transcoder], tokens_CT, special: tuple) -> dict:
    device = next(model.parameters()).device
    layers = tuple(sorted(tcs))
    stats = {layer: ReconstructionStats(tc.cfg.d_in, tc.cfg.d_sae) for layer, tc in tcs.items()}
    for start in range(0, tokens_CT.shape[0], EVAL_CONTEXTS_PER_FORWARD):
        ids = tokens_CT[start : start + EVAL_CONTEXTS_PER_FORWARD].to(device)
        for layer, (x, y) in mlp_io(model, ids, layers, ~special_mask(ids, special)).items():
            tc = tcs[layer]
            codes = tc.encode(x)
            y_hat, skip = tc.decode(codes), tc.skip(x)
            y_hat = y_hat if skip is None else y_hat + skip
            stats[layer].update(y, y_hat, (codes > 0).sum(1), (codes > 0).any(0))
    out = {}
    for layer, s in stats.items():
        result = s.result().as_dict()
        result["dead_fraction_heldout"] = result.pop("dead_fraction")
        out[layer] = result
    return out


def evaluate_set(
    model: nn.Module, tcs: dict[int, Transcoder], heldout_CT: torch.Tensor, special: tuple, lm_contexts: int
) -> dict:
    """{"layers": {layer: metrics}, "all_layers": metrics or {}} (see the module docstring)."""
    device = next(model.parameters()).device
    tcs = {layer: tc.to(device) for layer, tc in tcs.items()}
    layers = reconstruction_by_layer(model, tcs, heldout_CT, special)
    if lm_contexts <= 0:
        return {"layers": layers, "all_layers": {}}
    ordinary_CT = ~special_mask(heldout_CT, special)
    few = min(lm_contexts, PER_LAYER_LM_CONTEXTS)
    for layer in progress(len(tcs), "LM loss per layer", unit="layer", iterable=sorted(tcs)):
        alone = mlp_splice_metrics(model, {layer: _replacement(tcs[layer])}, heldout_CT[:few], ordinary_CT[:few])
        layers[layer].update({key: value for key, value in alone.as_dict().items() if key != "n_tokens"})
        layers[layer]["n_tokens_lm"] = alone.n_tokens
    replacements = {layer: _replacement(tc) for layer, tc in tcs.items()}
    every = mlp_splice_metrics(model, replacements, heldout_CT[:lm_contexts], ordinary_CT[:lm_contexts])
    return {"layers": layers, "all_layers": every.as_dict()}


def _replacement(tc: Transcoder):
    return lambda x_ND: tc.reconstruct(x_ND.float())
