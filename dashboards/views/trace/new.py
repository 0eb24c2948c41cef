"""The /trace page's prompt box: trace a new prompt with the run's transcoders and save it as a graph.

The compute is ``pipeline.tracing.document.trace_document``, the same as `saescope
trace`, on the server's shared CPU model and transcoders (``intervene.live_tracing``)
under the hook lock. Labels search the cache's last ``LABEL_CONTEXTS`` contexts.
The graph is written to ``RUN/graphs/NAME.json`` (NAME from the prompt unless
given) and the page then opens it. The set must cover every layer, as tracing needs; a cross-layer
set does by construction (``intervene.set_transcoders`` loads it whole).
A saved graph of the same name is refused unless "replace" is ticked; then all of that
name's files (graph, unpruned graph, supernodes) are replaced together, after the trace.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboards.resources import hook_lock, show_error
from dashboards.views.trace.intervene import live_tracing
from pipeline.lm.packing import encode_prompt, special_mask
from pipeline.tracing.document import TraceSettings, check_every_layer, set_source, target_token, trace_document
from pipeline.tracing.feature_labels import facts_from_index
from pipeline.tracing.graph_json import to_json
from pipeline.tracing.graph_tensors import graph_tensors
from storage.graph_groups import (
    check_graph_name,
    graph_files,
    graph_name_for,
    supernodes_path,
    write_graph_json,
    write_graph_tensors,
)
from storage.latent_facts import indexed_latents
from storage.sae_store import SaeStoreError
from storage.shards import activations_dir, read_manifest
from storage.training_data import last_context_tokens
from storage.transcoder_store import finished_sets, read_set, set_dir

LABEL_CONTEXTS = 16


def trace_form(run: Path) -> str | None:
    """The form; after a submitted trace, the saved graph's name (None otherwise; errors are shown)."""
    sets = finished_sets(run)
    if not sets:
        st.info(f"{run} has no transcoder sets: run `saescope train --run {run} --transcoder --layers all` first.")
        return None
    with st.form("trace-new"):
        prompt = st.text_input("prompt", "The capital of France is", max_chars=2000)
        cols = st.columns(4)
        target = cols[0].text_input("target token (empty: the top logits)", "")
        name = cols[1].text_input("graph name (empty: from the prompt)", "")
        max_nodes = cols[2].number_input("max feature nodes", 10, 10000, 2000, step=100)
        chosen = cols[3].selectbox("transcoders", sets)
        replace = st.checkbox("replace a saved graph of this name (its supernodes go with it)", False)
        go = st.form_submit_button("Trace")
    if not go:
        return None
    try:
        return _trace(run, prompt, target, name, int(max_nodes), chosen, replace)
    except (ValueError, OSError, SaeStoreError) as error:
        show_error(error)
        return None


def _trace(run: Path, prompt: str, target: str, name: str, max_nodes: int, set_name: str, replace: bool) -> str:
    if not prompt.strip():
        raise ValueError("the prompt is empty: type the text to trace")
    graph_name = check_graph_name(name.strip() or graph_name_for(prompt))
    if graph_files(run, graph_name) and not replace:
        raise ValueError(f"a graph named {graph_name!r} is already saved: give another name, or tick 'replace'")
    manifest = read_manifest(activations_dir(run))
    layers = read_set(set_dir(run, set_name))["layers"]
    check_every_layer(set_name, layers, int(manifest.provenance["model"]["n_layers"]), str(run))
    loaded, transcoders = live_tracing(str(run), set_name, tuple(layers))
    ids = encode_prompt(loaded.tokenizer, prompt)
    target_id = target_token(loaded.tokenizer, target) if target.strip() else None
    tokens_CT = last_context_tokens(activations_dir(run), manifest, LABEL_CONTEXTS)
    contexts = (tokens_CT, ~special_mask(tokens_CT, manifest.special_token_ids))
    source = set_source(graph_name, prompt, ids, run.resolve().name, set_name, layers, manifest.provenance["model"])
    folder = set_dir(run, set_name)
    with st.spinner(f"tracing {len(ids)} tokens through {len(layers)} transcoders…"), hook_lock():
        traced = trace_document(loaded.model, transcoders, ids, loaded.tokenizer, target_id,
                                TraceSettings(max_feature_nodes=max_nodes), source, contexts,
                                describe=lambda wanted: facts_from_index(indexed_latents(folder, wanted)))  # fmt: skip
    write_graph_tensors(run, graph_name, *graph_tensors(traced.graph))  # each write replaces the old file atomically
    write_graph_json(run, graph_name, to_json(traced.document))
    if replace:
        supernodes_path(run, graph_name).unlink(missing_ok=True)  # grouped the old graph's nodes
    return graph_name
