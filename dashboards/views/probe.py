"""Text probe: run a text to the SAE's layer and show which features fire on each token.

Special positions (BOS, EOS, padding) are left out of the ranking and the shading
unless the toggle shows them. Selecting a token's row lists its top features with
labels; selecting a feature (or picking it in the box) shades the text by it.
"""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st

from dashboards.render import feature_link, feature_links, short, token_label, token_spans
from dashboards.resources import (
    app_settings,
    feature_labels,
    hook_lock,
    live_model,
    selected_sae,
    show_error,
)
from pipeline.features.probe import ProbeResult, probe
from pipeline.lm.packing import SpecialTokens, encode_prompt
from pipeline.lm.token_text import vocab_bytes

MAX_PROBE_TOKENS = 256
TOP_PER_TOKEN = 5
N_STRONGEST = 30


def check_text(text: str, n_tokens: int) -> str | None:
    """A readable reason the text cannot be probed, or None."""
    if not text.strip():
        return "type some text to probe"
    if n_tokens > MAX_PROBE_TOKENS:
        return f"the text is {n_tokens} tokens long; the probe takes at most {MAX_PROBE_TOKENS}"
    return None


def render() -> None:
    st.title("Text probe")
    st.caption(f"The model runs to the SAE's layer only. At most {MAX_PROBE_TOKENS} tokens.")
    try:
        settings = app_settings()
        folder = selected_sae(settings)
    except ValueError as error:
        show_error(error)
        return
    with st.form("probe"):
        text = st.text_area("text", value=st.session_state.get("probe_text", ""), height=120)
        submitted = st.form_submit_button("Probe")
    if submitted and not run_probe(settings, folder, text):
        return
    if "probe_result" in st.session_state:
        show(folder, *st.session_state["probe_result"])


def run_probe(settings, folder, text: str) -> bool:
    """Probe ``text`` into the session state; False (after a message) when it cannot be probed."""
    try:
        loaded, sae, point = live_model(str(settings.run), str(folder))
    except ValueError as error:
        show_error(error)
        return False
    tokenizer = loaded.tokenizer
    ids = encode_prompt(tokenizer, text) if text.strip() else []
    problem = check_text(text, len(ids))
    if problem:
        st.warning(problem)
        return False
    with st.spinner("encoding…"), hook_lock():
        result = probe(loaded.model, sae, point, ids, SpecialTokens.from_tokenizer(tokenizer).special_ids)
    tokens = [tokenizer.decode([t]) for t in ids]
    st.session_state["probe_result"] = (tokens, vocab_bytes(tokenizer, ids), result)
    st.session_state["probe_text"] = text
    st.session_state.pop("probe_token", None)
    return True


def token_rows(tokens, raw, result: ProbeResult, labels: dict[int, str], include_special: bool) -> list[dict]:
    """One row per position: its visible token and its strongest features with labels (none at hidden specials)."""
    values, ids = result.top_features(TOP_PER_TOKEN)
    rows = []
    for t, token in enumerate(tokens):
        hidden = result.is_special(t) and not include_special
        active = [] if hidden else [(int(f), float(v)) for f, v in zip(ids[t], values[t], strict=True) if v > 0]
        rows.append(
            {
                "position": t,
                "token": token_label(token, raw[t]) + ("  (special)" if result.is_special(t) else ""),
                "top features": "  ".join(f"#{f} {v:.2f} {short(labels.get(f, ''), 30)}".rstrip() for f, v in active),
            }
        )
    return rows


def show(folder, tokens: list[str], raw, result: ProbeResult) -> None:
    include_special = st.toggle(
        "include special positions (BOS, EOS)",
        value=False,
        help="their activations are outliers (thousands); training and indexing leave them out",
    )
    strongest = result.strongest(N_STRONGEST, include_special)
    values, ids = result.top_features(TOP_PER_TOKEN)
    shown = {f for f, _ in strongest} | {int(f) for f in ids.flatten()}
    labels = feature_labels(folder, sorted(shown))
    st.caption("select a row to list that token's features")
    table = st.dataframe(
        pd.DataFrame(token_rows(tokens, raw, result, labels, include_special)),
        hide_index=True,
        width="stretch",
        on_select="rerun",
        selection_mode="single-row",
        key="probe_tokens",
    )
    selected = table.selection.rows if table is not None and hasattr(table, "selection") else []
    if selected:
        token_features(tokens, raw, result, labels, selected[0])
    if not strongest:
        st.info("no feature fires on this text" + ("" if include_special else " outside special positions"))
        return
    st.markdown("**features firing here** (strongest first; hover an id for its label)")
    st.html(feature_links([(f, f" {v:.2f}") for f, v in strongest], labels))
    feature = shade_choice(strongest, labels)
    acts = result.activations_of(feature, include_special)
    scale = max(max(acts), 1e-6)
    titles = [f"#{feature} {a:.3f}" + (" (special position)" if result.is_special(t) else "") for t, a in
              enumerate(acts)]  # fmt: skip
    st.html(token_spans(tokens, acts, scale, titles=titles, raw=raw, line_breaks=True))


def shade_choice(strongest: list[tuple[int, float]], labels: dict[int, str]) -> int:
    """The feature to shade by: picked in the box (with labels), or clicked in the list of features."""
    options = [f for f, _ in strongest]
    frame = pd.DataFrame([{"feature": f, "max here": round(v, 3), "label": labels.get(f, "")} for f, v in strongest])
    with st.expander("the same features in a table with labels (select one to shade by it)", expanded=False):
        picked = st.dataframe(
            frame, hide_index=True, width="stretch", on_select="rerun", selection_mode="single-row", key="probe_feats"
        )
    rows = picked.selection.rows if picked is not None and hasattr(picked, "selection") else []
    if rows and options[rows[0]] != st.session_state.get("probe_picked"):
        st.session_state["probe_picked"] = options[rows[0]]
        st.session_state["probe_shade"] = options[rows[0]]
    if st.session_state.get("probe_shade") not in options:
        st.session_state["probe_shade"] = options[0]
    return st.selectbox(
        "shade the text by feature",
        options,
        key="probe_shade",
        format_func=lambda f: f"#{f} {labels.get(f, '')}".rstrip(),
    )


def token_features(tokens, raw, result: ProbeResult, labels: dict[int, str], position: int) -> None:
    """The selected token's strongest features, each with its label and activation."""
    values, ids = result.top_features(TOP_PER_TOKEN * 2)
    pairs = [(int(f), float(v)) for f, v in zip(ids[position], values[position], strict=True) if v > 0]
    name = html.escape(token_label(tokens[position], raw[position]))
    note = " (a special position: its activations are outliers)" if result.is_special(position) else ""
    rows = "".join(
        f"<tr><td>{feature_link(f, labels.get(f))}</td><td>{v:.3f}</td><td>{html.escape(labels.get(f, ''))}</td></tr>"
        for f, v in pairs
    )
    st.html(
        f"<div><b>position {position}, token <code>{name}</code></b>{html.escape(note)}</div>"
        f"<table><tr><th>feature</th><th>activation</th><th>label</th></tr>{rows}</table>"
    )
