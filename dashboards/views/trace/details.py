"""The /trace page's panels under the chart: the selected node, its QK tracing, the pinned nodes, a clicked supernode.

Plain functions render HTML (tested without Streamlit); the panel functions draw
widgets. Labels and node ids are untrusted text: they reach the page only as
escaped HTML, widget options or table cells, never markdown.
"""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st

from dashboards.render import format_density, short
from dashboards.views.trace.layout import QkTracing, TraceGraph, TraceNode, feature_url


def node_text(node: TraceNode) -> str:
    """A node as one line of plain text for widget options."""
    where = "emb" if node.kind == "embedding" else "logit" if node.kind == "logit" else f"L{node.layer}"
    where = where if node.layer is not None or node.kind in ("embedding", "logit") else "·"
    feature = f" #{node.feature}" if node.kind == "feature" and node.feature is not None else ""
    return f"{where}{feature} @{node.position} · {node.kind} · {short(node.label or node.node_id, 50)}"


def name_of(graph: TraceGraph, node_id: str) -> str:
    """A node of the graph, or of its QK-only nodes, as one line; the bare id for a node the file lacks."""
    node = graph.by_id.get(node_id) or graph.qk_only.get(node_id)
    return node_text(node) if node else node_id


def details_html(node: TraceNode, transcoders: str | None = None) -> str:
    """One node's label, kind, layer, position, numbers, density, top example and feature link (to set
    ``transcoders``)."""
    numbers = " · ".join(
        f"{name} {value:.4g}" for name, value in (("activation", node.activation), ("influence", node.influence))
        if value is not None
    )  # fmt: skip
    if node.density is not None:
        numbers += f"{' · ' if numbers else ''}density {format_density(node.density)}{' (dense)' if node.dense else ''}"
    url = feature_url(node, transcoders)
    link = f' · <a href="{html.escape(url)}" target="_self">feature page</a>' if url else ""
    where = f"layer {node.layer} · " if node.layer is not None else ""
    example = f'<div class="trace-example">{html.escape(node.example)}</div>' if node.example else ""
    return (
        f'<div class="trace-node" data-node="{html.escape(node.node_id)}"><b>{html.escape(node.label or "no label")}'
        f"</b> <span style='color:#666'>· {html.escape(node.kind)} · {html.escape(where)}position "
        f"{node.position}{' · ' + numbers if numbers else ''}</span>{link}{example}</div>"
    )


def qk_frames(graph: TraceGraph, qk: QkTracing) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(Q marginal, K marginal, top pairs) as tables of node names and attributions, strongest first."""

    def side(entries: list[tuple[str, float]]) -> pd.DataFrame:
        rows = [{"node": name_of(graph, i), "attribution": a} for i, a in sorted(entries, key=lambda e: -abs(e[1]))]
        return pd.DataFrame(rows, columns=["node", "attribution"])

    pairs = sorted(qk.pairs, key=lambda p: -abs(p[2]))
    pair_rows = [{"query": name_of(graph, q), "key": name_of(graph, k), "attribution": a} for q, k, a in pairs]
    return side(qk.q_marginal), side(qk.k_marginal), pd.DataFrame(pair_rows, columns=["query", "key", "attribution"])


def qk_head_line(graph: TraceGraph, node_id: str) -> str:
    """Which head the node's QK tracing decomposes (its strongest, the first of ``saescope.qk_tracing`` for it):
    'head L23.H4 attends from " is"@5 to " France"@4 (pattern 0.88), score 5.39'; '' when the file lacks it."""
    entry = next((e for e in graph.saescope.get("qk_tracing") or [] if e.get("target") == node_id), None)
    if entry is None:
        return ""
    tokens = graph.prompt_tokens

    def at(pos: int) -> str:
        return f"{tokens[pos]!r}@{pos}" if 0 <= pos < len(tokens) else f"@{pos}"

    return (
        f"head L{entry['layer']}.H{entry['head']} attends from {at(int(entry['query_pos']))} to "
        f"{at(int(entry['key_pos']))} (pattern {float(entry['pattern']):.2f}), pre-softmax score "
        f"{float(entry['score']):.3g}: what the query and the key are made of"
    )


def qk_panel(graph: TraceGraph, node: TraceNode) -> None:
    """Q and K marginal contributors side by side, then the top query-key pairs (nothing without QK tracing)."""
    if node.qk is None:
        return
    q_side, k_side, pairs = qk_frames(graph, node.qk)
    head = qk_head_line(graph, node.node_id)
    if head:
        st.markdown(f"**QK tracing** · {head}", help="pipeline/tracing/qk.py: pairs sum to the score")
    left, right = st.columns(2)
    left.caption("Q marginal: what feeds the query")
    left.dataframe(q_side, hide_index=True, key="trace_qk_q")
    right.caption("K marginal: what feeds the key")
    right.dataframe(k_side, hide_index=True, key="trace_qk_k")
    st.caption("top query-key pairs")
    st.dataframe(pairs, hide_index=True, key="trace_qk_pairs")


def group_html(graph: TraceGraph, name: str, members: list[str], suggested: bool) -> str:
    """A supernode's name, whether it is suggested or saved, and each member's details."""
    by_id, transcoders = graph.by_id, graph.saescope.get("transcoders")
    rows = "".join(
        details_html(by_id[m], transcoders) if m in by_id else f"<div>{html.escape(m)} (not in this graph)</div>"
        for m in members
    )
    source = "suggested" if suggested else "saved"
    return f'<div class="trace-group"><b>{html.escape(name)}</b> <i>({source}, {len(members)} nodes)</i>{rows}</div>'
