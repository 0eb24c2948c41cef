"""An attribution graph file (Neuronpedia's graph JSON) as nodes and edges placed on a layers x positions grid.

Pure functions, no Streamlit. Rows are layers: embeddings at the bottom (row 0),
transcoder layer L at row L + 1, logits on the top row; columns are token
positions. Several nodes in one cell are spread across the cell, most
influential in the middle.

Fields read from the file: ``metadata.prompt``, ``metadata.prompt_tokens``,
``metadata.slug``, ``metadata.scores`` (replacement and completeness, unpruned and
pruned; absent in older files), ``saescope`` (kept as given); per node ``node_id``,
``feature``, ``layer``, ``ctx_idx``, ``feature_type``, ``clerp``,
``activation``, ``influence``, ``token_prob``, ``is_target_logit`` and, where the
tracer wrote them, ``saescope_density`` (the latent's firing density), ``saescope_example``
(its top example as plain text) and ``qk_tracing_results`` (``QkTracing``); per link
``source``, ``target``, ``weight``; ``qk_only_nodes`` (nodes named by QK tracing that the
pruned graph lacks); ``qParams``: ``supernodes`` (suggested groups, ``[name, node_id, ...]``
each), ``pinnedIds`` and ``clickedId`` (the view the file opens with). A transcoder feature's index is the middle
part of its ``node_id`` (``"{layer}_{feature}_{pos}"``, as circuit-tracer writes
it); only a node_id of another shape falls back to ``feature``, which schema 1
defines as cantor(layer, index) (``pipeline.tracing.graph_json.uncantor``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from urllib.parse import quote

from pipeline.tracing.graph_json import uncantor

KINDS = {
    "embedding": "embedding",
    "cross layer transcoder": "feature",
    "mlp reconstruction error": "error",
    "logit": "logit",
}
"""feature_type in the file -> the kind the page draws."""
CELL_WIDTH = 0.8
"""Fraction of a column the nodes of one cell spread over."""
DENSE_DENSITY = 0.1
"""A latent firing on more than this fraction of tokens is dense (hidden from the chart unless asked for) when the
node carries no ``saescope_dense`` mark: the default of `saescope index --transcoders --dense-threshold`, about 7x
the mean density of a TopK set with k 32 of 2304 latents (Neuronpedia's 0.99 marks none on the demo, 0.01 a third)."""


@dataclass(frozen=True)
class QkTracing:
    """Where an attention node's query and key came from (circuit-tracer's ``qk_tracing_results``)."""

    pairs: list[tuple[str, str, float]]
    """(query-side node_id, key-side node_id, attribution) of the strongest pairs."""
    q_marginal: list[tuple[str, float]]
    """(node_id, attribution) of the top contributors to the query, summed over keys."""
    k_marginal: list[tuple[str, float]]
    """(node_id, attribution) of the top contributors to the key, summed over queries."""


@dataclass(frozen=True)
class TraceNode:
    node_id: str
    kind: str
    """One of KINDS' values."""
    layer: int | None
    """Transcoder layer (features and error nodes); None for embeddings and logits."""
    position: int
    feature: int | None
    """Transcoder feature index (features), vocabulary id (logits) or None."""
    label: str
    activation: float | None
    influence: float | None
    token_prob: float | None
    is_target_logit: bool
    density: float | None = None
    """The latent's firing density (``saescope_density``), None where the file has none."""
    example: str = ""
    """The latent's top example as plain text (``saescope_example``), '' where the file has none."""
    qk: QkTracing | None = None
    dense_mark: bool | None = None
    """The index's own dense mark (``saescope_dense``), None where the file has none."""

    @property
    def dense(self) -> bool:
        if self.dense_mark is not None:
            return self.dense_mark
        return self.density is not None and self.density > DENSE_DENSITY


@dataclass(frozen=True)
class TraceGraph:
    name: str
    prompt: str
    prompt_tokens: list[str]
    nodes: list[TraceNode]
    links: list[tuple[str, str, float]]
    """(source node_id, target node_id, weight), links to unknown nodes dropped."""
    saescope: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    """``{"unpruned": {"replacement": r, "completeness": c}, "pruned": {...}}``, or {} when the file has none."""
    suggested: list[tuple[str, list[str]]] = field(default_factory=list)
    """Supernodes the file suggests (``qParams.supernodes``): (name, member node_ids)."""
    qk_only: dict[str, TraceNode] = field(default_factory=dict)
    """Nodes named by QK tracing that are not in the graph (``qk_only_nodes``), by node_id."""
    pinned: list[str] = field(default_factory=list)
    """``qParams.pinnedIds``: the nodes the file opens pinned."""
    clicked: str = ""
    """``qParams.clickedId``: the node the file opens selected ('' for none)."""

    @property
    def by_id(self) -> dict[str, TraceNode]:
        return {n.node_id: n for n in self.nodes}


def _float(value) -> float | None:
    return None if value is None else float(value)


def _feature_index(raw: dict, layer: int | None, position: int) -> int | None:
    parts = str(raw["node_id"]).split("_")
    if len(parts) == 3 and parts[1].lstrip("-").isdigit() and parts[2] == str(position) and parts[0] == str(layer):
        return int(parts[1])
    if raw.get("feature") is None:
        return None
    paired_layer, index = uncantor(int(raw["feature"]))
    return index if paired_layer == layer else None


def parse_node(raw: dict) -> TraceNode:
    """One node of the file; ValueError naming the node when a field is missing or of the wrong type."""
    try:
        kind = KINDS[raw["feature_type"]]
        position = int(raw["ctx_idx"])
        layer = int(raw["layer"]) if kind in ("feature", "error") else None
        if kind == "feature":
            feature = _feature_index(raw, layer, position)
        else:
            feature = None if kind != "logit" or raw.get("feature") is None else int(raw["feature"])
        return TraceNode(
            str(raw["node_id"]), kind, layer, position, feature, str(raw.get("clerp") or ""),
            _float(raw.get("activation")), _float(raw.get("influence")), _float(raw.get("token_prob")),
            bool(raw.get("is_target_logit", False)), _float(raw.get("saescope_density")),
            str(raw.get("saescope_example") or ""), parse_qk(raw.get("qk_tracing_results")),
            None if raw.get("saescope_dense") is None else bool(raw["saescope_dense"]),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"graph node {raw.get('node_id', '?')!r} is unreadable ({error!r})") from error


def parse_qk_only(raw) -> dict[str, TraceNode]:
    """``qk_only_nodes`` by node_id: a {node_id: node} dict as saescope and Neuronpedia's graph server write it, or
    a list of nodes. Contributors that are not graph nodes (biases, constants, earlier attention) keep their label,
    or their ``feature_type`` when they have none, under the kind "other"."""
    entries = list(raw.values()) if isinstance(raw, dict) else list(raw or [])
    nodes = {}
    for entry in entries:
        if entry.get("feature_type") in KINDS:
            node = parse_node(entry)
        else:
            label = str(entry.get("clerp") or entry.get("feature_type") or "")
            node = TraceNode(str(entry["node_id"]), "other", None, int(entry.get("ctx_idx") or 0), None, label,
                             None, None, None, False)  # fmt: skip
        nodes[node.node_id] = node
    return nodes


def parse_qk(raw) -> QkTracing | None:
    """A node's ``qk_tracing_results`` (None when absent); raises on a malformed entry (``parse_node`` names it)."""
    if raw is None:
        return None
    pairs = [(str(q), str(k), float(a)) for q, k, a in raw.get("pair_wise_contributors", [])]
    q_side = [(str(i), float(a)) for i, a in raw.get("top_q_marginal_contributors", [])]
    k_side = [(str(i), float(a)) for i, a in raw.get("top_k_marginal_contributors", [])]
    return QkTracing(pairs, q_side, k_side)


def parse_groups(raw) -> list[tuple[str, list[str]]]:
    """``qParams.supernodes`` (``[[name, node_id, ...], ...]``) as (name, members); ValueError on another shape."""
    groups = []
    for entry in raw or []:
        if not isinstance(entry, list) or not entry or not all(isinstance(x, str) for x in entry):
            raise ValueError(f"qParams.supernodes entry {entry!r} is not [name, node_id, ...]")
        groups.append((entry[0], list(entry[1:])))
    return groups


def parse_ids(raw) -> list[str]:
    """Node ids from a list, or from comma-separated text as in a Neuronpedia URL; blanks and repeats dropped."""
    items = raw.split(",") if isinstance(raw, str) else [str(x) for x in raw or []]
    return list(dict.fromkeys(item.strip() for item in items if item.strip()))


def parse_graph(data: dict, name: str) -> TraceGraph:
    """The graph in a graph file's JSON (ValueError saying what is missing)."""
    meta = data.get("metadata")
    if not isinstance(meta, dict) or not isinstance(data.get("nodes"), list):
        raise ValueError(f"graph {name!r} lacks 'metadata' or 'nodes': not a graph file")
    nodes = [parse_node(raw) for raw in data["nodes"]]
    known = {n.node_id for n in nodes}
    links = [
        (str(link["source"]), str(link["target"]), float(link["weight"]))
        for link in data.get("links", [])
        if str(link["source"]) in known and str(link["target"]) in known
    ]
    tokens = [str(t) for t in meta.get("prompt_tokens", [])]
    scores = meta.get("scores") if isinstance(meta.get("scores"), dict) else {}
    q_params = data.get("qParams") if isinstance(data.get("qParams"), dict) else {}
    qk_only = parse_qk_only(data.get("qk_only_nodes"))
    return TraceGraph(
        name, str(meta.get("prompt", "")), tokens, nodes, links, dict(data.get("saescope") or {}), dict(scores),
        parse_groups(q_params.get("supernodes")), qk_only, parse_ids(q_params.get("pinnedIds")),
        str(q_params.get("clickedId") or ""),
    )  # fmt: skip


def without_dense(graph: TraceGraph) -> TraceGraph:
    """The graph less its dense latents (``TraceNode.dense``) and their links."""
    kept = [n for n in graph.nodes if not n.dense]
    if len(kept) == len(graph.nodes):
        return graph
    ids = {n.node_id for n in kept}
    links = [link for link in graph.links if link[0] in ids and link[1] in ids]
    return replace(graph, nodes=kept, links=links)


def merged_groups(
    saved: list[tuple[str, list[str]]], suggested: list[tuple[str, list[str]]]
) -> list[tuple[str, list[str], bool]]:
    """(name, members, suggested?) of every supernode: the person's saved groups first, then the file's suggestions,
    less any suggestion of a saved name and less the members a saved group already holds (saved groups win)."""
    taken = {m for _, members in saved for m in members}
    names = {name for name, _ in saved}
    groups = [(name, list(members), False) for name, members in saved]
    for name, members in suggested:
        rest = [m for m in members if m not in taken]
        if name not in names and rest:
            groups.append((name, rest, True))
    return groups


def export_json(data: dict, pinned: list[str], clicked: str, groups: list[tuple[str, list[str], bool]]) -> dict:
    """The graph file with the page's view in ``qParams`` (pins, selection, every supernode), as Neuronpedia loads it.

    ``data`` is not changed; the other keys go out as read."""
    q_params = dict(data.get("qParams") or {})
    q_params.update(pinnedIds=list(pinned), clickedId=clicked, supernodes=[[name, *m] for name, m, _ in groups])
    return {**data, "qParams": q_params}


def row_labels(graph: TraceGraph) -> list[str]:
    """Row names bottom to top: embeddings, each transcoder layer up to the deepest, logits."""
    deepest = max((n.layer for n in graph.nodes if n.layer is not None), default=-1)
    return ["embeddings", *(f"L{layer}" for layer in range(deepest + 1)), "logits"]


def row_of(node: TraceNode, top_row: int) -> int:
    if node.kind == "embedding":
        return 0
    if node.kind == "logit":
        return top_row
    return int(node.layer) + 1


def place(graph: TraceGraph) -> dict[str, tuple[float, float]]:
    """node_id -> (x, y): column = position (spread within the cell), row = layer."""
    top_row = len(row_labels(graph)) - 1
    cells: dict[tuple[int, int], list[TraceNode]] = defaultdict(list)
    for node in graph.nodes:
        cells[(row_of(node, top_row), node.position)].append(node)
    placed = {}
    for (row, position), members in cells.items():
        members.sort(key=lambda n: -abs(n.influence or 0.0))
        order = _centre_out(len(members))
        step = CELL_WIDTH / len(members)
        for node, slot in zip(members, order, strict=True):
            placed[node.node_id] = (position + (slot - (len(members) - 1) / 2) * step, float(row))
    return placed


def _centre_out(n: int) -> list[int]:
    """Slots 0..n-1 in the order middle, then alternately right and left of it."""
    middle = (n - 1) // 2
    slots = [middle]
    for offset in range(1, n):
        for slot in (middle + offset, middle - offset):
            if 0 <= slot < n and len(slots) < n:
                slots.append(slot)
    return slots


def feature_url(node: TraceNode, transcoders: str | None = None) -> str | None:
    """The feature page of a transcoder feature node (``./feature?id=F&layer=L[&transcoders=NAME]``), else None."""
    if node.kind != "feature" or node.feature is None:
        return None
    url = f"./feature?id={int(node.feature)}&layer={int(node.layer)}"
    return f"{url}&transcoders={quote(str(transcoders), safe='')}" if transcoders else url


def node_rows(
    graph: TraceGraph, placed: dict[str, tuple[float, float]], clicked: str = "", pinned: tuple[str, ...] = ()
) -> list[dict]:
    """One plain-data row per node for the chart: position on the grid, what its tooltip shows, and its ``state``
    ('selected' for ``clicked``, 'pinned' for one of ``pinned``, else '')."""
    rows = []
    for node in graph.nodes:
        state = "selected" if node.node_id == clicked else "pinned" if node.node_id in pinned else ""
        x, y = placed[node.node_id]
        rows.append({
            "node_id": node.node_id, "x": x, "y": y, "kind": node.kind, "label": node.label,
            "layer": "E" if node.kind == "embedding" else "logits" if node.kind == "logit" else str(node.layer),
            "position": node.position, "activation": node.activation, "influence": node.influence,
            "feature": node.feature, "url": feature_url(node, graph.saescope.get("transcoders")),
            "density": node.density, "example": node.example, "state": state,
            "activation_text": _number(node.activation), "influence_text": _number(node.influence),
            "density_text": "" if node.density is None else f"{node.density:.3g}{' (dense)' if node.dense else ''}",
        })  # fmt: skip
    return rows


def _number(value: float | None) -> str:
    """A number for a tooltip, '' when the file has none (Vega would print 'null')."""
    return "" if value is None else f"{value:.4g}"


def edge_rows(graph: TraceGraph, placed: dict[str, tuple[float, float]]) -> list[dict]:
    """One row per link: its two ends, |weight| and sign."""
    rows = []
    for source, target, weight in graph.links:
        (x, y), (x2, y2) = placed[source], placed[target]
        rows.append({"x": x, "y": y, "x2": x2, "y2": y2, "weight": weight, "strength": abs(weight),
                     "sign": "positive" if weight >= 0 else "negative"})  # fmt: skip
    return rows


def group_boxes(groups: list[tuple[str, list[str], bool]], placed: dict[str, tuple[float, float]], pad: float = 0.3):
    """One box per supernode (name, members, suggested?) around its members' positions (members missing from the
    graph are ignored); ``source`` says 'suggested' or 'saved'. ``label`` is the name drawn above the box, '' for
    all but the largest box whose top sits in the same column and row (the rest would print over each other:
    the demo's 30 suggestions crowd layer 0); every box names itself in its tooltip."""
    boxes = []
    for name, members, suggested in groups:
        points = [placed[m] for m in members if m in placed]
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        boxes.append({"name": name, "x": min(xs) - pad, "x2": max(xs) + pad, "y": min(ys) - pad,
                      "y2": max(ys) + pad, "members": len(points),
                      "source": "suggested" if suggested else "saved"})  # fmt: skip
    labelled: set[tuple[int, int]] = set()
    for box in sorted(boxes, key=lambda b: (b["source"] != "saved", -b["members"])):
        spot = (round(box["x"] + pad), round(box["y2"]))
        box["label"] = "" if spot in labelled else box["name"]
        labelled.add(spot)
    return boxes
