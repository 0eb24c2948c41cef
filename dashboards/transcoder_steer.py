"""Steer with one transcoder latent: clamp it at every position and compare the continuation with the original.

The compute is ``pipeline.tracing.intervention`` with a position-less edit: at
every position, prompt and generated, the hook on layer L's MLP adds
``(v - a_f) * W_dec[f]`` to the MLP's output, so the latent reads ``v`` there
while the MLP's own output (the transcoder's error included) is kept. ``v`` is
given as a multiple of the latent's largest activation on the held-out contexts
(the page's statistics), as the SAE steering page takes multiples of a
feature's maximum. The original and steered top next tokens and greedy
continuations are shown side by side (``dashboards.views.trace.intervene.show``).
"""

from __future__ import annotations

import streamlit as st

from dashboards.resources import hook_lock, show_error
from dashboards.views.trace.intervene import show
from pipeline.lm.packing import encode_prompt
from pipeline.tracing.intervention import FeatureEdit, run_intervention


def steer_panel(loaded, transcoder, layer: int, latent: int, max_act: float) -> None:
    """The form, then (when submitted) the original and steered predictions side by side."""
    with st.form(f"steer-transcoder-{layer}-{latent}"):
        prompt = st.text_input("prompt", "The", max_chars=2000)
        cols = st.columns(4)
        factor = cols[0].number_input("clamp to × max activation", value=4.0, step=1.0)
        max_new = cols[1].number_input("greedy tokens", 1, 64, 16)
        chat = cols[2].checkbox("chat template")
        go = st.form_submit_button("Steer")
    if not go:
        return
    try:
        if not prompt.strip() and not chat:
            raise ValueError("the prompt is empty: type a few words to continue")
        if max_act <= 0:
            raise ValueError(f"latent {latent} never fires on the held-out contexts: there is no scale to clamp to")
        ids = encode_prompt(loaded.tokenizer, prompt, chat)
        edit = FeatureEdit(layer, None, latent, float(factor) * max_act)
        with hook_lock():
            result = run_intervention(
                loaded.model, {layer: transcoder}, [edit], ids, 10, int(max_new), loaded.tokenizer.eos_token_id
            )
    except ValueError as error:
        show_error(error)
        return
    st.caption(f"latent {latent} of layer {layer} clamped to {float(factor) * max_act:.4g} at every position")
    show(result, loaded.tokenizer)
