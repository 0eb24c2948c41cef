"""One prompt to its graph document: trace, prune, label, and lay out as Neuronpedia's graph JSON.

Shared by `saescope trace` and the /trace page's prompt box, so a graph made in
the browser is the same file the command writes. Labels (``feature_labels``) say
what each feature reads and writes: ``describe(layer -> latents)``, if given, brings
``LatentFacts`` from the layers' feature indexes and explanations; for latents it
knows nothing of, what they read comes from ``label_contexts`` (held-out token
contexts and their ordinary-position mask; None: the prompt only). Every feature
node gains ``saescope_density`` (share of indexed tokens it fires on) and
``saescope_dense`` (the index's dense mark), both null where no index knows it, and
``saescope_example`` (its strongest indexed example, plain text) where one does.
The document's ``saescope.timings`` gain ``labels_s`` and ``wall_s`` (this function's
whole time), and ``qk_s`` when ``settings.qk_targets`` asks for QK tracing (``qk``: the
heads that move information into the strongest targets, and why they attend).
``on_progress(stage, done, total)``, if given, hears of each backward pass (stage
"backward passes") and each batch of label contexts ("label contexts").
Unless ``settings.group`` is off, suggested supernodes (``supernodes.with_suggestions``) go into
``qParams`` and ``saescope.suggested_supernodes`` (with their own ``seconds``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.lm.packing import SpecialTokens
from pipeline.lm.token_text import token_text
from pipeline.tracing.attribution import Graph
from pipeline.tracing.feature_labels import LatentFacts, feature_labels, graph_latents, top_input_tokens
from pipeline.tracing.graph_json import FEATURE, graph_document
from pipeline.tracing.pruning import Pruned, prune
from pipeline.tracing.qk import qk_into_document
from pipeline.tracing.supernodes import with_suggestions
from pipeline.tracing.trace import trace


def target_token(tokenizer, text: str) -> int:
    """The one token ``text`` encodes to; ValueError otherwise, suggesting the form with a leading space."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) == 1:
        return int(ids[0])
    spaced = tokenizer(" " + text, add_special_tokens=False).input_ids if not text.startswith(" ") else []
    hint = f": did you mean ' {text}' (one token, with its leading space)?" if len(spaced) == 1 else ""
    raise ValueError(f"{text!r} is {len(ids)} tokens, not one{hint}")


@dataclass(frozen=True)
class TraceSettings:
    """How big a graph to attribute and how much of it to keep."""

    max_feature_nodes: int = 2000
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    batch_size: int = 32
    """Target rows per backward pass."""
    group: bool = True
    """Suggest supernodes (``supernodes.with_suggestions``, default ``GroupSettings``) in the document."""
    qk_targets: int = 2
    """Targets whose attention is QK-traced (``qk``): the strongest feature, the top logit, then more features;
    0 turns it off."""


@dataclass(frozen=True)
class GraphSource:
    """What the document records about where the graph came from."""

    name: str
    """Graph name (the file's stem and the viewer's slug)."""
    scan: str
    """The model's name, as the viewer's ``scan``."""
    prompt: str
    provenance: dict
    transcoder_list: list[str]


def check_every_layer(set_name: str, layers: list[int], n_layers: int, run: str) -> None:
    """ValueError unless the set covers layers 0..n_layers-1, as tracing needs."""
    if layers != list(range(n_layers)):
        covered = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
        raise ValueError(
            f"transcoder set {set_name!r} covers {covered} ({len(layers)} of {n_layers}): tracing needs every "
            f"layer; retrain it with `saescope train --run {run} --transcoder --name {set_name} --layers all --force`"
        )


def set_source(
    name: str, prompt: str, ids: list[int], run: str, set_name: str, layers: list[int], model: dict
) -> GraphSource:
    """Where a graph of ``prompt`` through run ``run``'s transcoder set came from (``run``: the run's name, not
    its path; ``model``: the cache's record, whose ``spec``, which can be a path of the machine, is left out)."""
    model = {key: value for key, value in model.items() if key != "spec"}
    provenance = {"run": run, "transcoders": set_name, "layers": sorted(layers), "model": model, "prompt_ids": ids}
    files = [f"{set_name}/layer-{layer:02d}" for layer in sorted(layers)]
    return GraphSource(name, str(model["name"]), prompt, provenance, files)


def _stage(on_progress: Callable[[str, int, int], None] | None, stage: str) -> Callable[[int, int], None] | None:
    if on_progress is None:
        return None
    return lambda done, total: on_progress(stage, done, total)


@dataclass(frozen=True)
class TracedPrompt:
    graph: Graph
    pruned: Pruned
    document: dict


def dense_features(graph, facts: dict[tuple[int, int], LatentFacts]) -> frozenset[int]:
    """Feature-node indices whose latent the index marks dense."""
    return frozenset(
        i for i, (layer, _pos, latent) in enumerate(graph.features.tolist())
        if (known := facts.get((layer, latent))) is not None and known.dense
    )  # fmt: skip


def mark_density(nodes: list[dict], facts: dict[tuple[int, int], LatentFacts]) -> None:
    """Add ``saescope_density`` and ``saescope_dense`` to every feature node (null where unknown), and
    ``saescope_example`` (its strongest indexed example as plain text) where the index has one."""
    for node in nodes:
        if node["feature_type"] != FEATURE:
            continue
        known = facts.get((int(node["layer"]), int(node["node_id"].split("_")[1])))
        node["saescope_density"] = None if known is None else known.density
        node["saescope_dense"] = None if known is None else known.dense
        if known is not None and known.example:
            node["saescope_example"] = known.example


def trace_document(
    model: nn.Module,
    transcoders: dict,
    ids: list[int],
    tokenizer,
    target: int | None,
    settings: TraceSettings,
    source: GraphSource,
    label_contexts: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    describe: Callable[[dict[int, list[int]]], dict[tuple[int, int], LatentFacts]] | None = None,
) -> TracedPrompt:
    """The graph of ``ids`` through ``transcoders`` (one per layer), pruned and labelled, as a document."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    special = SpecialTokens.from_tokenizer(tokenizer).special_ids
    graph = trace(model, torch.tensor(ids, device=device), transcoders, target, settings.max_feature_nodes,
                  settings.batch_size, special_ids=special,
                  on_batch=_stage(on_progress, "backward passes"))  # fmt: skip
    pruned = prune(graph.adjacency, graph.target_weights(), graph.n_features, graph.n_errors,
                   settings.node_threshold, settings.edge_threshold)  # fmt: skip
    labelled = time.perf_counter()
    facts = describe(graph_latents(graph)) if describe is not None else {}
    inputs = {}
    unknown = {layer: [latent for latent in latents if not (facts.get((layer, latent)) or LatentFacts()).knows_reads]
               for layer, latents in graph_latents(graph).items()}  # fmt: skip
    if label_contexts is not None and any(unknown.values()):
        inputs = top_input_tokens(model, transcoders, unknown, *label_contexts,
                                  on_batch=_stage(on_progress, "label contexts"))  # fmt: skip
    labels = feature_labels(model, transcoders, graph, tokenizer, inputs, facts=facts)
    document = graph_document(
        graph, pruned, lambda t: token_text(tokenizer, t), source.name, source.scan, source.prompt,
        settings.node_threshold, settings.edge_threshold, source.provenance, labels, source.transcoder_list,
    )  # fmt: skip
    mark_density(document["nodes"], facts)
    timings = document["saescope"]["timings"]
    timings["labels_s"] = time.perf_counter() - labelled
    if settings.group:
        with_suggestions(document, graph.adjacency, pruned, graph.features)
    if settings.qk_targets:
        qk_started = time.perf_counter()
        qk_into_document(document, model, transcoders, graph, pruned, settings.qk_targets, labels=labels,
                         dense=dense_features(graph, facts))  # fmt: skip
        timings["qk_s"] = time.perf_counter() - qk_started
    timings["wall_s"] = time.perf_counter() - started
    return TracedPrompt(graph, pruned, document)
