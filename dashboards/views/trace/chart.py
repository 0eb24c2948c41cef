"""The attribution graph as one Altair (Vega-Lite) chart: edges, supernode boxes, nodes, token and layer labels.

No Streamlit here. Every text (labels, tokens, supernode names) goes into the
chart as data: Vega draws text marks as text, and its tooltip handler escapes
HTML, so a clerp like ``<b>*x*</b>`` shows as exactly those characters.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

from dashboards.render import token_label
from dashboards.views.trace.layout import TraceGraph, edge_rows, group_boxes, node_rows, place, row_labels

SHAPES = {"embedding": "square", "feature": "circle", "error": "diamond", "logit": "triangle-up"}
COLOURS = {"embedding": "#7f7f7f", "feature": "#ff8800", "error": "#9ecae1", "logit": "#2ca02c"}
SIGN_COLOURS = {"positive": "#1f77b4", "negative": "#d62728"}
NODE_SELECTION = "node"
"""Name of the click selection on the node layer (Streamlit returns it under this key)."""
GROUP_SELECTION = "group"
"""Name of the click selection on the supernode boxes."""
GROUP_COLOURS = {"saved": "#6a3d9a", "suggested": "#1b9e77"}
RING_COLOURS = {"selected": "#000000", "pinned": "#e6ab02"}
SVG_MAX_LINKS = 8000
"""Up to this many links the chart is drawn as SVG (each node an element with its tooltip text as aria-label,
which a browser test can click); above it on a canvas, which stays fast."""
TOOLTIP = [
    alt.Tooltip("label:N", title="label"),
    alt.Tooltip("kind:N"),
    alt.Tooltip("layer:N"),
    alt.Tooltip("position:Q"),
    alt.Tooltip("activation_text:N", title="activation"),
    alt.Tooltip("influence_text:N", title="influence"),
    alt.Tooltip("density_text:N", title="density"),
    alt.Tooltip("example:N", title="top example"),
    alt.Tooltip("node_id:N"),
]


def _axisless(title: str | None = None) -> dict:
    """No axis: every layer must say so, as a rect layer with axes beside a selecting layer without them fails to draw
    in the browser (Vega-Lite: "Cannot read properties of undefined (reading 'forEach')")."""
    return {"axis": None, "title": title}


def edge_layer(edges: pd.DataFrame) -> alt.Chart:
    """Links as straight segments: width by |weight|, colour by sign."""
    return (
        alt.Chart(edges)
        .mark_rule(opacity=0.45)
        .encode(
            x=alt.X("x:Q", **_axisless()),
            y=alt.Y("y:Q", **_axisless()),
            x2="x2:Q",
            y2="y2:Q",
            strokeWidth=alt.StrokeWidth("strength:Q", scale=alt.Scale(range=[0.3, 4]), legend=None),
            color=alt.Color(
                "sign:N",
                scale=alt.Scale(domain=list(SIGN_COLOURS), range=list(SIGN_COLOURS.values())),
                legend=alt.Legend(title="link"),
            ),
        )
    )


def node_layer(nodes: pd.DataFrame) -> alt.Chart:
    """Nodes: shape and fill by kind, hover tooltip, click selects one."""
    pick = alt.selection_point(name=NODE_SELECTION, fields=["node_id"], on="click")
    kinds = list(SHAPES)
    return (
        alt.Chart(nodes)
        .mark_point(filled=True, size=90, stroke="#333", strokeWidth=0.5)
        .encode(
            x=alt.X("x:Q", **_axisless()),
            y=alt.Y("y:Q", **_axisless()),
            shape=alt.Shape("kind:N", scale=alt.Scale(domain=kinds, range=[SHAPES[k] for k in kinds])),
            fill=alt.Fill(
                "kind:N",
                scale=alt.Scale(domain=kinds, range=[COLOURS[k] for k in kinds]),
                legend=alt.Legend(title="node"),
            ),
            tooltip=TOOLTIP,
        )
        .add_params(pick)
    )


def ring_layer(nodes: pd.DataFrame) -> list[alt.Chart]:
    """A ring around the selected node (black) and each pinned node (gold), drawn under the nodes."""
    marked = nodes[nodes["state"] != ""] if "state" in nodes else nodes.iloc[0:0]
    if marked.empty:
        return []
    states = list(RING_COLOURS)
    ring = alt.Chart(marked).mark_point(shape="circle", size=420, filled=False, strokeWidth=3)
    colour = alt.Color("state:N", scale=alt.Scale(domain=states, range=list(RING_COLOURS.values())), legend=None)
    return [ring.encode(x=alt.X("x:Q", **_axisless()), y=alt.Y("y:Q", **_axisless()), color=colour)]


def box_layers(boxes: pd.DataFrame) -> list[alt.Chart]:
    """Supernodes: a shaded box around the members (purple: saved, green: suggested), its name above; click one
    to select it."""
    if boxes.empty:
        return []
    pick = alt.selection_point(name=GROUP_SELECTION, fields=["name"], on="click")
    scale = alt.Scale(domain=list(GROUP_COLOURS), range=list(GROUP_COLOURS.values()))
    x, y = alt.X("x:Q", **_axisless()), alt.Y("y:Q", **_axisless())
    rect = alt.Chart(boxes).mark_rect(opacity=0.12, strokeWidth=1.5)
    rect = rect.encode(
        x=x, x2="x2:Q", y=y, y2="y2:Q",
        color=alt.Color("source:N", scale=scale, legend=alt.Legend(title="supernode")),
        stroke=alt.Stroke("source:N", scale=scale, legend=None),
        tooltip=[alt.Tooltip("name:N", title="supernode"), alt.Tooltip("source:N"), alt.Tooltip("members:Q")],
    ).add_params(pick)  # fmt: skip
    text = alt.Chart(boxes).mark_text(dy=-8, fontWeight="bold", align="left")
    text = text.encode(
        x=x, y=alt.Y("y2:Q", **_axisless()), text="label:N", color=alt.Color("source:N", scale=scale, legend=None)
    )
    return [rect, text]


def label_layers(graph: TraceGraph) -> list[alt.Chart]:
    """Prompt tokens under their columns and layer names beside their rows, as text marks."""
    tokens = pd.DataFrame(
        [{"x": float(i), "y": -0.8, "text": token_label(t)} for i, t in enumerate(graph.prompt_tokens)],
        columns=["x", "y", "text"],
    )
    rows = pd.DataFrame([{"x": -1.0, "y": float(r), "text": name} for r, name in enumerate(row_labels(graph))])
    token_text = alt.Chart(tokens).mark_text(angle=300, align="right", fontSize=11, font="monospace")
    row_text = alt.Chart(rows).mark_text(align="right", color="#666", fontSize=11)
    x, y = alt.X("x:Q", **_axisless()), alt.Y("y:Q", **_axisless())
    return [token_text.encode(x=x, y=y, text="text:N"), row_text.encode(x=x, y=y, text="text:N")]


def frames(
    graph: TraceGraph,
    groups: list[tuple[str, list[str], bool]],
    max_links: int | None = None,
    clicked: str = "",
    pinned: tuple[str, ...] = (),
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(nodes, edges, supernode boxes) as data frames of plain values; edges: the ``max_links`` largest |weight|;
    groups: (name, members, suggested?); ``clicked`` and ``pinned`` set the nodes' ``state``."""
    placed = place(graph)
    edge_columns = ["x", "y", "x2", "y2", "weight", "strength", "sign"]
    edges = pd.DataFrame(edge_rows(graph, placed), columns=edge_columns)
    if max_links is not None and len(edges) > max_links:
        edges = edges.nlargest(max_links, "strength", keep="first").sort_index()
    return (
        pd.DataFrame(node_rows(graph, placed, clicked, pinned)),
        edges,
        pd.DataFrame(group_boxes(groups, placed), columns=["name", "x", "x2", "y", "y2", "members", "source", "label"]),
    )


def graph_chart(
    graph: TraceGraph,
    groups: list[tuple[str, list[str], bool]],
    height: int = 640,
    max_links: int | None = None,
    clicked: str = "",
    pinned: tuple[str, ...] = (),
) -> alt.LayerChart:
    """The whole graph as one layered chart, nodes on top of rings and boxes on top of edges (the ``max_links``
    strongest); a ring marks ``clicked`` and each of ``pinned``."""
    nodes, edges, boxes = frames(graph, groups, max_links, clicked, pinned)
    layers = [edge_layer(edges), *box_layers(boxes), *ring_layer(nodes), node_layer(nodes), *label_layers(graph)]
    renderer = "svg" if len(edges) <= SVG_MAX_LINKS else "canvas"
    return (
        alt.layer(*layers)
        .properties(height=height, usermeta={"embedOptions": {"renderer": renderer}})
        .resolve_scale(color="independent")
    )
