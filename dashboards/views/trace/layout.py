"""An attribution graph file (Neuronpedia's graph JSON) as nodes and edges placed on a layers x positions grid.

Pure functions, no Streamlit. Rows are layers: embeddings at the bottom (row 0),
transcoder layer L at row L + 1, logits on the top row; columns are token
positions. Several nodes in one cell are spread across the cell, most
influential in the middle.

Fields read from the file: ``metadata.prompt``, ``metadata.prompt_tokens``,
``metadata.slug``, ``metadata.scores`` (replacement and completeness, unpruned and
pruned; absent in older files), ``saescope`` (kept as given); per node ``node_id``,
``feature``, ``layer``, ``ctx_idx``, ``feature_type``, ``clerp``,
``activation``, ``influence``, ``token_prob``, ``is_target_logit``; per link
``source``, ``target``, ``weight``. A transcoder feature's index is the middle
part of its ``node_id`` (``"{layer}_{feature}_{pos}"``, as circuit-tracer writes
it); only a node_id of another shape falls back to ``feature``, which schema 1
defines as cantor(layer, index) (``pipeline.tracing.graph_json.uncantor``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
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
            bool(raw.get("is_target_logit", False)),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"graph node {raw.get('node_id', '?')!r} is unreadable ({error!r})") from error


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
    return TraceGraph(
        name, str(meta.get("prompt", "")), tokens, nodes, links, dict(data.get("saescope") or {}), dict(scores)
    )


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


def node_rows(graph: TraceGraph, placed: dict[str, tuple[float, float]]) -> list[dict]:
    """One plain-data row per node for the chart: position on the grid and what its tooltip shows."""
    rows = []
    for node in graph.nodes:
        x, y = placed[node.node_id]
        rows.append({
            "node_id": node.node_id, "x": x, "y": y, "kind": node.kind, "label": node.label,
            "layer": "E" if node.kind == "embedding" else "logits" if node.kind == "logit" else str(node.layer),
            "position": node.position, "activation": node.activation, "influence": node.influence,
            "feature": node.feature, "url": feature_url(node, graph.saescope.get("transcoders")),
        })  # fmt: skip
    return rows


def edge_rows(graph: TraceGraph, placed: dict[str, tuple[float, float]]) -> list[dict]:
    """One row per link: its two ends, |weight| and sign."""
    rows = []
    for source, target, weight in graph.links:
        (x, y), (x2, y2) = placed[source], placed[target]
        rows.append({"x": x, "y": y, "x2": x2, "y2": y2, "weight": weight, "strength": abs(weight),
                     "sign": "positive" if weight >= 0 else "negative"})  # fmt: skip
    return rows


def group_boxes(groups: list[tuple[str, list[str]]], placed: dict[str, tuple[float, float]], pad: float = 0.3):
    """One box per supernode around its members' positions (members missing from the graph are ignored)."""
    boxes = []
    for name, members in groups:
        points = [placed[m] for m in members if m in placed]
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        boxes.append({"name": name, "x": min(xs) - pad, "x2": max(xs) + pad, "y": min(ys) - pad,
                      "y2": max(ys) + pad, "members": len(points)})  # fmt: skip
    return boxes
