"""The /trace page's intervention panel: ablate or clamp chosen feature nodes, compare top logits and continuations.

The compute is ``pipeline.tracing.intervention`` (its docstring holds the semantics).
Here: the model from the run's activation manifest, and layer L's transcoder from
the set ``RUN/transcoders/<transcoders>/layer-LL/`` (``storage.transcoder_store``),
where ``<transcoders>`` and the layers come from the graph file's ``saescope`` block.
A cross-layer set loads whole, as one ``CrossLayerTranscoder``, and each layer is its
``layer_view``: an edit of a feature of layer l then changes its writes into layers l..L-1.
Tokens are shown as escaped text only.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from dashboards.render import token_label, token_spans
from dashboards.resources import hook_lock, show_error
from dashboards.views.trace.layout import TraceGraph, TraceNode
from pipeline.lm.models import load_model
from pipeline.lm.packing import encode_prompt
from pipeline.sae.cross_layer_format import clt_from_circuit_tracer
from pipeline.sae.transcoder_format import transcoder_from_saelens
from pipeline.tracing.intervention import FeatureEdit, InterventionResult, run_intervention
from storage.constants import TRANSCODER_SET
from storage.home import converted_models_dir
from storage.sae_store import SaeStoreError
from storage.shards import activations_dir, read_manifest
from storage.transcoder_store import is_cross_layer, load_clt_files, load_layer_files, read_set, set_dir


@st.cache_resource(max_entries=2, show_spinner="loading the model and transcoders (once per server)…")
def live_tracing(run: str, name: str, layers: tuple[int, ...]):
    """(loaded model, {layer: Transcoder or CltLayer}) on the CPU, shared by every session."""
    manifest = read_manifest(activations_dir(Path(run)))
    loaded = load_model(
        manifest.model_spec, "cpu", convert_dir=converted_models_dir(), expect_revision=manifest.model_revision
    )
    return loaded, set_transcoders(set_dir(Path(run), name), layers)


def set_transcoders(folder: Path, layers: tuple[int, ...]) -> dict:
    """Layer -> transcoder of a per-layer set (``layers`` of it), or -> ``CltLayer`` of a cross-layer set (all)."""
    if not (folder / TRANSCODER_SET).is_file() or not is_cross_layer(read_set(folder)):  # per-layer: layer by layer
        return {layer: transcoder_from_saelens(*load_layer_files(folder, layer)) for layer in layers}
    try:
        clt = clt_from_circuit_tracer(*load_clt_files(folder))
    except ValueError as error:
        raise SaeStoreError(f"{folder}: {error}") from error
    return {layer: clt.layer_view(layer) for layer in range(clt.cfg.n_layers)}


def prompt_ids(tokenizer, graph: TraceGraph) -> list[int]:
    """The prompt's ids as the graph saw them (ValueError when they do not line up with its tokens)."""
    for ids in (encode_prompt(tokenizer, graph.prompt), tokenizer(graph.prompt, add_special_tokens=False).input_ids):
        if len(ids) == len(graph.prompt_tokens):
            return [int(i) for i in ids]
    raise ValueError(f"the prompt does not re-encode to the graph's {len(graph.prompt_tokens)} tokens")


def edits_for(nodes: list[TraceNode], mode: str, factor: float) -> list[FeatureEdit]:
    """Ablate (0) or clamp each node to ``factor`` x its activation in the graph, at its position."""
    return [
        FeatureEdit(int(n.layer), n.position, int(n.feature), 0.0 if mode == "ablate" else factor * (n.activation or 0))
        for n in nodes
    ]


def panel(run: Path, graph: TraceGraph) -> None:
    """The form, then (when submitted) the original and edited predictions side by side."""
    nodes = [n for n in graph.nodes if n.kind == "feature" and n.feature is not None and n.layer is not None]
    if not nodes:
        return
    by_id = {n.node_id: n for n in nodes}
    with st.form("intervene"):
        chosen = st.multiselect("feature nodes", list(by_id), format_func=lambda i: _option(by_id[i]), key="trace_edit")
        cols = st.columns(3)
        mode = cols[0].radio("edit", ["ablate", "clamp"], horizontal=True)
        factor = cols[1].number_input("clamp to × activation", value=2.0, step=0.5)
        max_new = cols[2].number_input("greedy tokens", 1, 64, 12)
        go = st.form_submit_button("Run intervention")
    if not go:
        return
    meta = graph.saescope
    try:
        if not chosen:
            raise ValueError("choose at least one feature node")
        if not meta.get("transcoders") or not meta.get("layers"):
            raise ValueError("the graph file's 'saescope' block names no transcoders and layers")
        loaded, transcoders = live_tracing(str(run), str(meta["transcoders"]), tuple(int(x) for x in meta["layers"]))
        ids = prompt_ids(loaded.tokenizer, graph)
        edits = edits_for([by_id[i] for i in chosen], mode, factor)
        eos = loaded.tokenizer.eos_token_id
        with hook_lock():
            result = run_intervention(loaded.model, transcoders, edits, ids, 10, int(max_new), eos)
    except (ValueError, FileNotFoundError, OSError, SaeStoreError) as error:
        show_error(error)
        return
    show(result, loaded.tokenizer)


def _option(node: TraceNode) -> str:
    return f"L{node.layer} #{node.feature} @{node.position} · act {node.activation or 0:.3g} · {node.label[:50]}"


def top_frame(top: list[tuple[int, float]], tokenizer) -> pd.DataFrame:
    return pd.DataFrame([{"token": token_label(tokenizer.decode([t])), "p": p} for t, p in top])


def show(result: InterventionResult, tokenizer) -> None:
    """Top next tokens and greedy continuations, original on the left, edited on the right."""
    left, right = st.columns(2)
    for col, title, top, ids in (
        (left, "original", result.original_top, result.original_ids),
        (right, "intervened", result.edited_top, result.edited_ids),
    ):
        col.subheader(title)
        col.dataframe(top_frame(top, tokenizer), hide_index=True)
        tokens = [tokenizer.decode([t]) for t in ids]
        with col:
            st.html(f'<div class="generation" data-role="{title}">'
                    f"{token_spans(tokens, [0.0] * len(tokens), 1.0, line_breaks=True)}</div>")  # fmt: skip
