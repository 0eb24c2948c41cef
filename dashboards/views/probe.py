"""Text probe: run a text to the SAE's layer and show which features fire on each token."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboards.render import link, shade_tokens
from dashboards.resources import app_settings, hook_lock, live_model, selected_sae, show_error
from pipeline.features.probe import probe

MAX_PROBE_TOKENS = 256
TOP_PER_TOKEN = 5


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
    if submitted:
        loaded, sae, layer = live_model(str(settings.run), str(folder))
        bos = loaded.tokenizer.bos_token_id
        ids = ([bos] if bos is not None else []) + loaded.tokenizer(text, add_special_tokens=False).input_ids
        problem = check_text(text, len(ids))
        if problem:
            st.warning(problem)
            return
        with st.spinner("encoding…"), hook_lock():
            result = probe(loaded.model, sae, layer, ids)
        tokens = [loaded.tokenizer.decode([t]) for t in ids]
        st.session_state["probe_result"] = (tokens, result)
        st.session_state["probe_text"] = text
    if "probe_result" in st.session_state:
        show(*st.session_state["probe_result"])


def show(tokens: list[str], result) -> None:
    values, ids = result.top_features(TOP_PER_TOKEN)
    rows = []
    for t, token in enumerate(tokens):
        active = [(int(f), float(v)) for f, v in zip(ids[t], values[t], strict=True) if v > 0]
        rows.append(
            {"position": t, "token": repr(token), "top features": "  ".join(f"#{f} {v:.2f}" for f, v in active)}
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    strongest = sorted({int(f) for f, v in zip(ids.flatten(), values.flatten(), strict=True) if v > 0},
                       key=lambda f: -float(result.feats_TF[:, f].max()))  # fmt: skip
    if not strongest:
        st.info("no feature fires on this text")
        return
    st.markdown("features firing here: " + " · ".join(link("feature", f"#{f}", id=f) for f in strongest[:30]))
    feature = st.selectbox("shade the text by feature", strongest)
    acts = result.activations_of(feature)
    st.markdown(shade_tokens(tokens, acts, max(max(acts), 1e-6)), unsafe_allow_html=True)
