"""Graph feature labels: what each feature fires on (its strongest input tokens) and what it writes.

Shape legend: C contexts, T positions, B contexts in a batch, N ordinary tokens, L latents of one layer.

A graph names a few hundred (layer, latent) pairs; a label that says only what a
latent writes (its logit lens) leaves out what it reads. ``top_input_tokens``
runs the model once per batch of contexts (stopping after the deepest layer
asked for, ``capture``), encodes every asked layer's MLP input with its
transcoder, and keeps, for each asked latent, the distinct token ids at its
highest activations: the first ``top_n`` distinct tokens in order of activation
(ties broken by position, so the result is deterministic). ``feature_labels``
joins those with the tokens the feature's decoder row promotes most through the
unembedding (its logit lens) into the viewer's label, ``a · b → c · d``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.features.decoder_geometry import final_norm_weight, logit_effects, unembedding
from pipeline.lm.hook_points import HookPoint, capture
from pipeline.lm.token_text import token_text
from pipeline.sae.transcoder import Transcoder
from pipeline.tracing.attribution import Graph


@torch.inference_mode()
def top_input_tokens(
    model: nn.Module,
    transcoders: dict[int, Transcoder],
    wanted: dict[int, list[int]],
    tokens_CT: torch.Tensor,
    ordinary_CT: torch.Tensor,
    top_n: int = 3,
    batch_contexts: int = 8,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[tuple[int, int], list[int]]:
    """(layer, latent) -> up to ``top_n`` distinct token ids where it fires hardest ([] if it never fires).

    ``on_batch(contexts done, contexts in all)``, if given, is called after each batch of contexts.
    """
    layers = sorted(layer for layer, latents in wanted.items() if latents)
    if not layers or tokens_CT.shape[0] == 0:
        return {(layer, latent): [] for layer, latents in wanted.items() for latent in latents}
    device = next(model.parameters()).device
    points = {layer: HookPoint(layer, "mlp-in") for layer in layers}
    acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    token_ids: list[torch.Tensor] = []
    for start in range(0, tokens_CT.shape[0], batch_contexts):
        ids_BT = tokens_CT[start : start + batch_contexts].to(device=device, dtype=torch.long)
        ordinary_BT = ordinary_CT[start : start + batch_contexts].to(device)
        captured = capture(model, ids_BT, points.values())
        token_ids.append(ids_BT[ordinary_BT].cpu())
        for layer in layers:
            x_ND = captured[points[layer]][ordinary_BT].float()
            latents = torch.tensor(wanted[layer], device=device)
            acts[layer].append(transcoders[layer].encode(x_ND)[:, latents].cpu())
        if on_batch is not None:
            on_batch(min(start + batch_contexts, tokens_CT.shape[0]), tokens_CT.shape[0])
    tokens_N = torch.cat(token_ids)
    return {
        (layer, latent): _distinct_top(column, tokens_N, top_n)
        for layer in layers
        for latent, column in zip(wanted[layer], torch.cat(acts[layer]).T, strict=True)
    }


def _distinct_top(acts_N: torch.Tensor, tokens_N: torch.Tensor, top_n: int) -> list[int]:
    chosen: list[int] = []
    for position in torch.argsort(-acts_N, stable=True).tolist():
        if acts_N[position] <= 0 or len(chosen) == top_n:
            break
        token = int(tokens_N[position])
        if token not in chosen:
            chosen.append(token)
    return chosen


def graph_latents(graph: Graph) -> dict[int, list[int]]:
    """layer -> the sorted latents of the graph's feature nodes there."""
    wanted: dict[int, set[int]] = {}
    for layer, _, latent in graph.features.tolist():
        wanted.setdefault(int(layer), set()).add(int(latent))
    return {layer: sorted(latents) for layer, latents in sorted(wanted.items())}


def _shown(tokenizer, ids: list[int]) -> str:
    return " · ".join(repr(token_text(tokenizer, t))[1:-1] for t in ids)


def feature_labels(
    model: nn.Module, transcoders: dict, graph: Graph, tokenizer, inputs: dict | None = None, top_n: int = 3
) -> dict[tuple[int, int], str]:
    """(layer, latent) -> 'a · b → c · d': the tokens it fires on (``inputs``), those its decoder row promotes."""
    inputs = inputs or {}
    labels = {}
    W_U, gamma = unembedding(model).float(), final_norm_weight(model)
    for layer, latents in graph_latents(graph).items():
        rows = transcoders[layer].W_dec.detach()[latents].float()
        _, promoted, _, _ = logit_effects(rows, W_U, None if gamma is None else gamma.float(), top_n)
        for latent, ids in zip(latents, promoted.tolist(), strict=True):
            fires_on = _shown(tokenizer, inputs.get((layer, latent), []))
            labels[(layer, latent)] = (fires_on + " " if fires_on else "") + "→ " + _shown(tokenizer, ids)
    return labels
