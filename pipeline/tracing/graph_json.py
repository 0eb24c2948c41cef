"""A pruned Graph as the JSON document Neuronpedia's attribution-graph viewer uploads, and back.

The schema is Neuronpedia's graph schema 1, as circuit-tracer's ``create_graph_files`` writes
it (its pydantic models in ``frontend/graph_models.py``):

    metadata  slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold, schema_version (1)
    qParams   pinnedIds, supernodes, linkType, clickedId, sg_pos
    nodes     node_id, feature, layer, ctx_idx, feature_type, token_prob, is_target_logit,
              run_idx, reverse_ctx_idx, jsNodeId, clerp, influence, activation
    links     source, target, weight (source and target are node_ids)

Node ids, per kind (``feature_type``):
    feature     "cross layer transcoder"    "{layer}_{latent}_{pos}"; feature = cantor(layer, latent)
                                            with cantor(x, y) = (x + y)(x + y + 1)/2 + y (one id per
                                            (layer, latent) pair, inverted by ``uncantor``)
    error       "mlp reconstruction error"  "{layer}_-1_{pos}"; feature = -1; jsNodeId "err_{layer}_{pos}-0"
                                            (circuit-tracer's "{layer}_{pos}-0" can equal the jsNodeId of
                                            feature latent pos of that layer, so saescope deviates here)
    token       "embedding"                 "E_{token}_{pos}"; layer "E", feature = pos
    logit       "logit"                     "{n_layers + 1}_{token}_{pos}"; clerp 'Output "tok" (p=0.123)'
                                            (the viewer reads p from the clerp); the most likely is the target

QK tracing (``qk``), when on: the node of each traced target carries ``qk_tracing_results``
``{"pair_wise_contributors": [[q_id, k_id, a]], "top_q_marginal_contributors": [[id, a]],
"top_k_marginal_contributors": [[id, a]]}`` for its strongest head, as Neuronpedia's graph
server attaches it; contributors missing from the pruned nodes are described in the top-level
``qk_only_nodes`` ({node_id: node}); every traced head is listed under ``saescope.qk_tracing``.

``influence`` is the node's cumulative influence share (``pruning.cumulative_share``).
Nodes exist only where the graph has them: no feature or error node at BOS or another
constant position (``attribution``). ``metadata.scores`` holds the graph's replacement
and completeness scores (``scores``), ``{"unpruned": {"replacement": r, "completeness":
c}, "pruned": {...}}``. saescope's own provenance (model, run by name, transcoders,
timings, thresholds) goes under the top-level key ``saescope``, which the viewer ignores;
no field holds a path of the machine. Text in, text out: writing the file (atomically)
is the caller's job.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from pipeline.tracing.attribution import Graph
from pipeline.tracing.pruning import Pruned
from pipeline.tracing.scores import unpruned_and_pruned

FORMAT_VERSION = 1
"""Version of saescope's own ``saescope`` block."""
SCHEMA_VERSION = 1
"""Neuronpedia's graph schema version, ``metadata.schema_version``."""
FEATURE, ERROR, EMBEDDING, LOGIT = "cross layer transcoder", "mlp reconstruction error", "embedding", "logit"
TOP_LEVEL_KEYS = ("metadata", "qParams", "nodes", "links")


class GraphDocument(NamedTuple):
    """The parsed document."""

    metadata: dict[str, Any]
    qParams: dict[str, Any]
    nodes: list[dict[str, Any]]
    links: list[dict[str, Any]]
    saescope: dict[str, Any]


def display_token(text: str) -> str:
    """A token as the viewer shows it: newline, tab and carriage return made visible."""
    return text.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def cantor(x: int, y: int) -> int:
    """Cantor's pairing of two naturals: (x + y)(x + y + 1)/2 + y."""
    return (x + y) * (x + y + 1) // 2 + y


def uncantor(z: int) -> tuple[int, int]:
    """The (x, y) with cantor(x, y) == z."""
    w = (math.isqrt(8 * z + 1) - 1) // 2
    y = z - w * (w + 1) // 2
    return w - y, y


def node_entry(node_id: str, feature: int | None, layer: str, pos: int, kind: str, js_id: str, **extra) -> dict:
    """One node in the viewer's form: the fields every node carries, then ``extra`` (also for ``qk_only_nodes``)."""
    base = {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": kind}
    fields = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js_id}
    return {**base, **fields, "clerp": "", "influence": None, "activation": None, **extra}


def graph_nodes(
    graph: Graph,
    cumulative: list[float],
    decode: Callable[[int], str],
    labels: Mapping[tuple[int, int], str] | None = None,
) -> list[dict[str, Any]]:
    """Every node of the graph in viewer form, in adjacency order."""
    nodes = []
    for i, ((layer, pos, latent), act) in enumerate(
        zip(graph.features.tolist(), graph.activations.tolist(), strict=True)
    ):
        clerp = (labels or {}).get((layer, latent), "")
        feature = cantor(layer, latent)
        nodes.append(node_entry(f"{layer}_{latent}_{pos}", feature, str(layer), pos, FEATURE, f"{layer}_{latent}-0"))
        nodes[-1].update(clerp=clerp, influence=cumulative[i], activation=act)
    for k in range(graph.n_errors):
        layer, pos = graph.error_node(k)
        node = node_entry(f"{layer}_-1_{pos}", -1, str(layer), pos, ERROR, f"err_{layer}_{pos}-0")
        nodes.append({**node, "influence": cumulative[len(nodes)]})
    for pos, token in enumerate(graph.prompt_ids.tolist()):
        node = node_entry(f"E_{token}_{pos}", pos, "E", pos, EMBEDDING, f"E_{token}-{pos}")
        nodes.append({**node, "influence": cumulative[len(nodes)]})
    last, logit_layer = graph.n_pos - 1, str(graph.n_layers + 1)
    for k, (token, prob) in enumerate(zip(graph.logit_tokens.tolist(), graph.logit_probs.tolist(), strict=True)):
        clerp = f'Output "{display_token(decode(token))}" (p={prob:.3f})'
        node = node_entry(f"{logit_layer}_{token}_{last}", token, logit_layer, last, LOGIT, f"L_{token}-{last}")
        nodes.append({**node, "token_prob": prob, "is_target_logit": k == 0, "clerp": clerp})
    return nodes


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def graph_document(
    graph: Graph,
    pruned: Pruned,
    decode: Callable[[int], str],
    slug: str,
    scan: str,
    prompt: str,
    node_threshold: float,
    edge_threshold: float,
    provenance: Mapping[str, Any] | None = None,
    labels: Mapping[tuple[int, int], str] | None = None,
    transcoder_list: list[str] | None = None,
) -> dict[str, Any]:
    """The viewer's document for the nodes and edges that survived ``pruned``.

    ``decode`` turns one token id into text; ``labels`` maps (layer, latent) to a feature's
    explanation (the clerp); ``provenance`` (model, run, transcoder names and hashes, ...) is
    stored under ``saescope`` with the graph's own counts and timings.
    """
    all_nodes = graph_nodes(graph, pruned.cumulative_N.tolist(), decode, labels)
    layout = (graph.n_features, graph.n_errors, graph.n_pos)
    kept = pruned.node_mask_N.nonzero().flatten().tolist()
    targets, sources = pruned.edge_mask_NN.nonzero().unbind(1)
    weights = graph.adjacency[targets, sources].tolist()
    links = [
        {"source": all_nodes[s]["node_id"], "target": all_nodes[t]["node_id"], "weight": w}
        for t, s, w in zip(targets.tolist(), sources.tolist(), weights, strict=True)
    ]
    own = {
        "format_version": FORMAT_VERSION,
        "edge_threshold": edge_threshold,
        "n_active_features": graph.n_active_features,
        "n_feature_nodes": graph.n_features,
        "n_backward_passes": graph.n_backward_passes,
        "logit_error": graph.logit_error,
        "timings": dict(graph.timings),
    }
    metadata = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": list(transcoder_list or []),
        "prompt_tokens": [display_token(decode(t)) for t in graph.prompt_ids.tolist()],
        "prompt": prompt,
        "node_threshold": node_threshold,
        "schema_version": SCHEMA_VERSION,
        "scores": unpruned_and_pruned(graph.adjacency, graph.target_weights(), pruned.edge_mask_NN, layout),
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    nodes = [all_nodes[i] for i in kept]
    document = {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}
    return _finite({**document, "saescope": {**own, **(provenance or {})}})


def to_json(document: Mapping[str, Any]) -> str:
    """The document as JSON text (strict: no NaN or infinity)."""
    return json.dumps(document, ensure_ascii=False, allow_nan=False, indent=1)


def from_json(text: str) -> GraphDocument:
    """Parse a graph document; ValueError naming a missing top-level key or a link to an unknown node."""
    data = json.loads(text)
    missing = [key for key in TOP_LEVEL_KEYS if key not in data]
    if missing:
        raise ValueError(f"not an attribution graph document: missing {', '.join(missing)}")
    ids = {node["node_id"] for node in data["nodes"]}
    dangling = [link for link in data["links"] if link["source"] not in ids or link["target"] not in ids]
    if dangling:
        raise ValueError(f"link {dangling[0]['source']} -> {dangling[0]['target']} names a node not in the graph")
    return GraphDocument(data["metadata"], data["qParams"], data["nodes"], data["links"], data.get("saescope", {}))
