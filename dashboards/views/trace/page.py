"""Attribution graphs (``/trace?graph=NAME``): the pruned graph on a layers x positions grid, supernodes, links out.

A prompt box (``new``) traces a new prompt and opens its graph. The page reads
``RUN/graphs/NAME.json`` (Neuronpedia's graph-file JSON; which fields, see ``layout``),
shows the graph's replacement and completeness scores at the top (unpruned, and pruned in
brackets), and draws it as one Altair chart: embeddings at the bottom, logits on top, prompt
tokens under the columns. Hover a node for its label, layer, position, activation, influence,
density and top example; click it (or choose it in the box below) to select it: its details,
a link to its feature page (``/feature?id=F&layer=L&transcoders=NAME``), its QK tracing when
the file has one, and a button that pins it. The selection and the pins live in the URL as
Neuronpedia's ``clickedId`` and ``pinnedIds`` (comma-separated node ids), so a view can be
shared and a reload restores it; without them the file's own ``qParams`` give the view.
Dense latents (``layout.DENSE_DENSITY``) are hidden until a toggle shows them.

Supernodes: the file's suggestions (``qParams.supernodes``, green boxes) and the person's
own groups, saved beside the graph (``NAME.supernodes.json``, purple boxes), which win over
suggestions (``layout.merged_groups``); click a box for its members. "Download" gives the
graph file with the view (pins, selection, every supernode) in its ``qParams``, as
Neuronpedia's upload takes it. Labels, tokens and names are untrusted text: they reach the
page only as chart data, widget options, table cells or escaped HTML, never markdown.
"""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st

from dashboards.render import token_spans
from dashboards.resources import app_settings, show_error
from dashboards.views.trace.chart import GROUP_SELECTION, NODE_SELECTION, graph_chart
from dashboards.views.trace.details import details_html, group_html, node_text, qk_panel
from dashboards.views.trace.intervene import panel
from dashboards.views.trace.layout import (
    DENSE_DENSITY,
    TraceGraph,
    export_json,
    merged_groups,
    parse_graph,
    parse_ids,
    without_dense,
)
from dashboards.views.trace.new import trace_form
from storage.graph_groups import graph_names, graph_path, read_graph_json, read_supernodes, write_supernodes

DEFAULT_LINKS = 3000
"""Links drawn until the reader asks for more: a pruned graph keeps tens of thousands, most of them faint."""
CHART_KEY = "trace_chart"
SEEN_KEY = "trace_chart_seen"
"""The chart's node selection the page last acted on: only a change of it is a new click."""
NODE_KEY = "trace_node"
PINS_KEY = "trace_pins"
CLICKED, PINNED = "clickedId", "pinnedIds"
"""URL query parameters, named as in Neuronpedia's graph links and the graph file's ``qParams``."""


@st.cache_data(max_entries=8, show_spinner=False)
def _parsed(run: str, name: str, version: tuple[int, int]) -> TraceGraph:
    return parse_graph(read_graph_json(Path(run), name), name)


def load_graph(run: Path, name: str) -> TraceGraph:
    """The parsed graph, read again when its file changes (keyed by modification time and size)."""
    stat = graph_path(run, name).stat()
    return _parsed(str(run), name, (stat.st_mtime_ns, stat.st_size))


def _graph_changed() -> None:
    """Another graph: its node ids mean other nodes, so the selection and the pins go."""
    for key in (CLICKED, PINNED):
        if key in st.query_params:
            del st.query_params[key]


def chosen_graph(names: list[str]) -> str:
    wanted = st.query_params.get("graph")
    index = names.index(wanted) if wanted in names else 0
    name = st.selectbox("graph", names, index=index, on_change=_graph_changed)
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


def supernode_editor(run: Path, name: str, graph: TraceGraph, groups: list[tuple[str, list[str]]]) -> None:
    """Group chosen nodes under a name, or remove a group; saved beside the graph, then the page reloads."""
    by_id = graph.by_id
    with st.form("supernode"):
        members = st.multiselect("nodes", list(by_id), format_func=lambda i: node_text(by_id[i]), key="trace_members")
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


def url_ids(key: str, default: list[str], known) -> list[str]:
    """The node ids in query parameter ``key`` (comma-separated; ``default`` when the URL lacks it) that are in
    ``known``."""
    ids = parse_ids(st.query_params[key]) if key in st.query_params else default
    return [i for i in ids if i in known]


def write_url_ids(key: str, ids: list[str], default: list[str]) -> None:
    """Put ``ids`` in the URL; an empty list drops the parameter unless the file's default would then come back."""
    if ids or default:
        st.query_params[key] = ",".join(ids)
    elif key in st.query_params:
        del st.query_params[key]


def chart_selection(name: str, field: str) -> str | None:
    """The ``field`` of what the chart's selection ``name`` holds now (session state, so before the chart is drawn)."""
    try:
        picked = st.session_state[CHART_KEY]["selection"][name]
    except (KeyError, TypeError):
        return None
    return str(picked[0][field]) if picked and field in picked[0] else None


def take_chart_click(clicked: str) -> str:
    """A node newly clicked on the chart wins over ``clicked`` (from the URL); an unchanged selection does not."""
    picked = chart_selection(NODE_SELECTION, "node_id")
    if picked == st.session_state.get(SEEN_KEY):
        return clicked
    st.session_state[SEEN_KEY] = picked
    return picked or clicked


def _chosen_in_box(default: str) -> None:
    write_url_ids(
        CLICKED, [st.session_state[NODE_KEY]] if st.session_state[NODE_KEY] else [], [default] * bool(default)
    )


def _set_pins(pins: list[str], default: list[str]) -> None:
    write_url_ids(PINNED, pins, default)


def node_panel(graph: TraceGraph, clicked: str, pinned: list[str]) -> None:
    """The node box (the clicked node chosen), then its details, a pin button and its QK tracing."""
    by_id = graph.by_id
    st.session_state[NODE_KEY] = clicked
    st.selectbox(
        "node (or click one in the chart)", ["", *by_id], key=NODE_KEY, on_change=_chosen_in_box, args=(graph.clicked,),
        format_func=lambda i: node_text(by_id[i]) if i else "none selected",
    )  # fmt: skip
    if not clicked:
        return
    node = by_id[clicked]
    st.html(details_html(node, graph.saescope.get("transcoders")))
    pins = [p for p in pinned if p != clicked] if clicked in pinned else [*pinned, clicked]
    st.button("Unpin" if clicked in pinned else "Pin", on_click=_set_pins, args=(pins, graph.pinned), key="trace_pin")
    qk_panel(graph, node)


def pins_panel(graph: TraceGraph, pinned: list[str]) -> None:
    """The pinned nodes: a box to unpin (or pin) any, and each one's details."""
    by_id = graph.by_id
    st.session_state[PINS_KEY] = pinned
    st.multiselect(
        "pinned nodes", list(by_id), key=PINS_KEY, format_func=lambda i: node_text(by_id[i]),
        on_change=lambda: _set_pins(st.session_state[PINS_KEY], graph.pinned),
    )  # fmt: skip
    if pinned:
        transcoders = graph.saescope.get("transcoders")
        st.html("".join(details_html(by_id[p], transcoders) for p in pinned))


def group_panel(run: Path, name: str, graph: TraceGraph, groups, saved: list[tuple[str, list[str]]]) -> None:
    """The supernode whose box was clicked: its members; a suggested one can be saved as the person's own."""
    picked = chart_selection(GROUP_SELECTION, "name")
    group = next((g for g in groups if g[0] == picked), None)
    if group is None:
        return
    st.html(group_html(graph, *group))
    if group[2] and st.button("Save as my supernode", key="trace_adopt"):
        write_supernodes(run, name, [*saved, (group[0], group[1])])
        st.rerun()


def shown_graph(graph: TraceGraph) -> TraceGraph:
    """The graph less its dense latents, unless the toggle (shown only when there are some) asks for them."""
    n_dense = sum(node.dense for node in graph.nodes)
    if not n_dense:
        return graph
    label = f"show dense latents ({n_dense} marked dense by the index, or firing on over {DENSE_DENSITY:.0%} of tokens)"
    return graph if st.toggle(label, False, key="trace_dense") else without_dense(graph)


def download_button(run: Path, name: str, pinned: list[str], clicked: str, groups) -> None:
    """The graph file with the page's view in its ``qParams`` (built when clicked)."""

    def data() -> bytes:
        return json.dumps(export_json(read_graph_json(run, name), pinned, clicked, groups)).encode("utf-8")

    st.download_button(
        "Download graph JSON", data, file_name=f"{name}.json", mime="application/json", on_click="ignore",
        help="the graph file with the pins, the selected node and every supernode in its qParams, for "
        "Neuronpedia's graph upload",
    )  # fmt: skip


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
        saved = read_supernodes(settings.run, name)
    except ValueError as error:
        show_error(error)
        return
    graph_view(settings.run, name, graph, saved)


def graph_view(run: Path, name: str, graph: TraceGraph, saved: list[tuple[str, list[str]]]) -> None:
    """Scores, prompt, chart and the panels below it, for one loaded graph."""
    if scores := scores_text(graph.scores):
        st.caption(
            scores,
            help="replacement: share of the targets' influence that starts at a token rather than "
            "an error node; completeness: influence-weighted share of node inputs not from error nodes",
        )
    st.html(prompt_html(graph))
    groups = merged_groups(saved, graph.suggested)
    by_id = graph.by_id
    pinned = url_ids(PINNED, graph.pinned, by_id)
    clicked = take_chart_click(next(iter(url_ids(CLICKED, [graph.clicked], by_id)), ""))
    write_url_ids(CLICKED, [clicked] if clicked else [], [graph.clicked] * bool(graph.clicked))
    write_url_ids(PINNED, pinned, graph.pinned)
    shown = shown_graph(graph)
    n_links = links_to_draw(len(shown.links))
    drawn = f"the {n_links:,} strongest of {len(shown.links):,} links" if n_links < len(shown.links) else "all links"
    n_suggested = sum(g[2] for g in groups)
    st.caption(f"{len(shown.nodes):,} nodes · {drawn} · {len(saved)} saved and {n_suggested} suggested supernodes")
    chart = graph_chart(shown, groups, max_links=n_links, clicked=clicked, pinned=tuple(pinned))
    st.altair_chart(chart, on_select="rerun", key=CHART_KEY, width="stretch")
    group_panel(run, name, graph, groups, saved)
    node_panel(graph, clicked, pinned)
    pins_panel(graph, pinned)
    download_button(run, name, pinned, clicked, groups)
    st.subheader("Supernodes")
    supernode_editor(run, name, graph, saved)
    st.subheader("Intervene")
    st.caption("ablate or clamp feature nodes at their positions; the original and the edited model side by side")
    panel(run, graph)
