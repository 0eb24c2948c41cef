"""Attribution graphs (``/trace?graph=NAME``): the pruned graph on a layers x positions grid, supernodes, links out.

A prompt box (``dashboards.views.trace.new``) traces a new prompt and opens its graph.
The page reads ``RUN/graphs/NAME.json`` (Neuronpedia's graph-file JSON; which fields,
see ``dashboards.views.trace.layout``), shows the graph's replacement and completeness scores
at the top (unpruned, and pruned in brackets), and draws it as one Altair chart: embeddings at
the bottom, logits on top, prompt tokens under the columns. Hover a node for its
label, layer, position, activation and influence; click it (or choose it in the
box below) for a link to its feature page, ``/feature?id=F&layer=L&transcoders=NAME`` for a
transcoder feature. Nodes grouped into a named supernode are saved beside the
graph (``NAME.supernodes.json``) and drawn as one box. Labels, tokens and names
are untrusted text: they reach the page only as chart data, widget options or
escaped HTML, never markdown.
"""

from __future__ import annotations

import html
from pathlib import Path

import streamlit as st

from dashboards.render import short, token_spans
from dashboards.resources import app_settings, show_error
from dashboards.views.trace.chart import NODE_SELECTION, graph_chart
from dashboards.views.trace.intervene import panel
from dashboards.views.trace.layout import TraceGraph, TraceNode, feature_url, parse_graph
from dashboards.views.trace.new import trace_form
from storage.graph_groups import graph_names, graph_path, read_graph_json, read_supernodes, write_supernodes

DEFAULT_LINKS = 3000
"""Links drawn until the reader asks for more: a pruned graph keeps tens of thousands, most of them faint."""


@st.cache_data(max_entries=8, show_spinner=False)
def _parsed(run: str, name: str, version: tuple[int, int]) -> TraceGraph:
    return parse_graph(read_graph_json(Path(run), name), name)


def load_graph(run: Path, name: str) -> TraceGraph:
    """The parsed graph, read again when its file changes (keyed by modification time and size)."""
    stat = graph_path(run, name).stat()
    return _parsed(str(run), name, (stat.st_mtime_ns, stat.st_size))


def node_text(node: TraceNode) -> str:
    """A node as one line of plain text for widget options."""
    where = "emb" if node.kind == "embedding" else "logit" if node.kind == "logit" else f"L{node.layer}"
    feature = f" #{node.feature}" if node.kind == "feature" else ""
    return f"{where}{feature} @{node.position} · {node.kind} · {short(node.label or node.node_id, 50)}"


def chosen_graph(names: list[str]) -> str:
    wanted = st.query_params.get("graph")
    name = st.selectbox("graph", names, index=names.index(wanted) if wanted in names else 0)
    st.query_params["graph"] = name
    return name


def scores_text(scores: dict) -> str:
    """The graph's replacement and completeness scores, unpruned then pruned, as one line ('' without scores)."""
    try:
        parts = [
            f"{kind} {scores['unpruned'][kind]:.3f} (pruned {scores['pruned'][kind]:.3f})"
            for kind in ("replacement", "completeness")
        ]
    except (KeyError, TypeError, ValueError):
        return ""
    return "scores: " + " · ".join(parts)


def prompt_html(graph: TraceGraph) -> str:
    """The prompt's tokens, escaped and outlined, numbered by position on hover."""
    tokens = graph.prompt_tokens
    spans = token_spans(tokens, [0.0] * len(tokens), 1.0, titles=[f"position {i}" for i in range(len(tokens))])
    return f'<div class="trace-prompt">{spans}</div>'


def links_to_draw(n_links: int) -> int:
    """How many of the strongest links the chart draws (a slider when there are more than the default)."""
    if n_links <= DEFAULT_LINKS:
        return n_links
    return st.slider("links drawn (strongest first)", 1, n_links, DEFAULT_LINKS, key="trace_links")


def clicked_node(event) -> str | None:
    """The node_id a click on the chart selected, if any."""
    try:
        picked = event["selection"][NODE_SELECTION]
    except (KeyError, TypeError):
        return None
    return str(picked[0]["node_id"]) if picked and "node_id" in picked[0] else None


def node_details(graph: TraceGraph, clicked: str | None) -> None:
    """A box of every node (the clicked one chosen), then its label, numbers and feature page link."""
    ids = [n.node_id for n in graph.nodes]
    by_id = graph.by_id
    index = ids.index(clicked) if clicked in by_id else 0
    chosen = st.selectbox("node", ids, index=index, format_func=lambda i: node_text(by_id[i]), key="trace_node")
    st.html(details_html(by_id[chosen], graph.saescope.get("transcoders")))


def details_html(node: TraceNode, transcoders: str | None = None) -> str:
    """One node's label, kind, layer, position, activation, influence and feature link (to set ``transcoders``)."""
    numbers = " · ".join(
        f"{name} {value:.4g}" for name, value in (("activation", node.activation), ("influence", node.influence))
        if value is not None
    )  # fmt: skip
    url = feature_url(node, transcoders)
    link = f' · <a href="{html.escape(url)}" target="_self">feature page</a>' if url else ""
    where = f"layer {node.layer}" if node.layer is not None else node.kind
    return (
        f'<div class="trace-node" data-node="{html.escape(node.node_id)}"><b>{html.escape(node.label or "no label")}'
        f"</b> <span style='color:#666'>· {html.escape(node.kind)} · {html.escape(where)} · position "
        f"{node.position}{' · ' + numbers if numbers else ''}</span>{link}</div>"
    )


def supernode_editor(run: Path, name: str, graph: TraceGraph, groups: list[tuple[str, list[str]]]) -> None:
    """Group chosen nodes under a name, or remove a group; saved beside the graph, then the page reloads."""
    by_id = graph.by_id
    with st.form("supernode"):
        members = st.multiselect("nodes", list(by_id), format_func=lambda i: node_text(by_id[i]))
        group = st.text_input("supernode name")
        if st.form_submit_button("Save supernode"):
            try:
                write_supernodes(run, name, [*(g for g in groups if g[0] != group.strip()), (group.strip(), members)])
            except ValueError as error:
                show_error(error)
            else:
                st.rerun()
    if groups:
        names = [g for g, _ in groups]
        cols = st.columns([3, 1])
        gone = cols[0].selectbox("saved supernodes", names, key="trace_group")
        if cols[1].button("Remove supernode"):
            write_supernodes(run, name, [g for g in groups if g[0] != gone])
            st.rerun()


def render() -> None:
    st.title("Trace")
    try:
        settings = app_settings()
        names = graph_names(settings.run)
    except ValueError as error:
        show_error(error)
        return
    with st.expander("Trace a new prompt", expanded=not names):
        made = trace_form(settings.run)
    if made is not None:
        st.query_params["graph"] = made
        st.rerun()
    if not names:
        st.info(f"No attribution graphs in {settings.run / 'graphs'} yet: trace a prompt above.")
        return
    name = chosen_graph(names)
    try:
        graph = load_graph(settings.run, name)
        groups = read_supernodes(settings.run, name)
    except ValueError as error:
        show_error(error)
        return
    if scores := scores_text(graph.scores):
        st.caption(
            scores,
            help="replacement: share of the targets' influence that starts at a token rather than "
            "an error node; completeness: influence-weighted share of node inputs not from error nodes",
        )
    st.html(prompt_html(graph))
    shown = links_to_draw(len(graph.links))
    drawn = f"the {shown:,} strongest of {len(graph.links):,} links" if shown < len(graph.links) else "all links"
    st.caption(f"{len(graph.nodes):,} nodes · {drawn} · {len(groups)} supernodes")
    chart = graph_chart(graph, groups, max_links=shown)
    event = st.altair_chart(chart, on_select="rerun", key="trace_chart", width="stretch")
    node_details(graph, clicked_node(event))
    st.subheader("Supernodes")
    supernode_editor(settings.run, name, graph, groups)
    st.subheader("Intervene")
    st.caption("ablate or clamp feature nodes at their positions; the original and the edited model side by side")
    panel(settings.run, graph)
