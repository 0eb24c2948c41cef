"""``trace``: one prompt, one transcoder per layer -> its attribution graph (record, replace, attribute).

Pruning (``pruning.prune``) and the Neuronpedia JSON (``graph_json``) are separate steps on the Graph.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from pipeline.tracing.attribution import Graph, attribute, constant_mask, target_logits
from pipeline.tracing.replacement import build_replacement, record_prompt, replacement_logits


def trace(
    model: nn.Module,
    tokenizer_ids: torch.Tensor,
    transcoders: Mapping[int, nn.Module] | Sequence[nn.Module],
    target: int | None = None,
    max_feature_nodes: int = 2000,
    batch_size: int = 32,
    cover: float = 0.95,
    max_logits: int = 10,
    special_ids: Sequence[int] = (),
    on_batch: Callable[[int, int], None] | None = None,
) -> Graph:
    """The attribution graph of one prompt (token ids [T], no padding) through per-layer transcoders.

    Targets: the ``target`` token's logit at the last position, or the most likely tokens there
    covering ``cover`` of the probability (at most ``max_logits``). ``max_feature_nodes`` caps the
    feature nodes (see ``attribution``); ``batch_size`` targets share one backward pass, after each
    of which ``on_batch(done, total)`` is called if given.
    Position 0 and the positions holding one of ``special_ids`` (the tokens the transcoders were
    not trained on) are constants, not nodes (``attribution.constant_mask``).
    """
    start = time.perf_counter()
    record = record_prompt(model, tokenizer_ids)
    rep = build_replacement(record, transcoders)
    recorded = time.perf_counter()
    with torch.no_grad():
        logit_error = float((replacement_logits(model, rep)[-1] - record.logits_TV[-1]).abs().max())
    tokens, probs = target_logits(record.logits_TV[-1], target, cover, max_logits)
    constant_T = constant_mask(tokenizer_ids, special_ids)
    graph = attribute(model, rep, tokens, probs, max_feature_nodes, batch_size, constant_T, on_batch)
    timings = {"record_s": recorded - start, **graph.timings, "total_s": time.perf_counter() - start}
    return dataclasses.replace(graph, timings=timings, logit_error=logit_error)
