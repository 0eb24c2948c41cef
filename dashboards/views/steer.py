"""Steering: default and steered generations side by side from the same seed, or a strength sweep."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from dashboards.render import shade_tokens
from dashboards.resources import app_settings, feature_index, hook_lock, live_model, selected_sae, show_error
from pipeline.lm.packing import encode_prompt
from pipeline.steering.edit import MODES, POSITIONS, FeatureScale, Strength, build_spec
from pipeline.steering.generation import SamplingConfig, check_length, compare


def parse_features(text: str, n_features: int) -> list[int]:
    """Comma-separated feature ids, each checked against the SAE's size."""
    try:
        features = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as error:
        raise ValueError(f"features {text!r}: give ids separated by commas, e.g. 12, 40") from error
    if not features:
        raise ValueError("give at least one feature id")
    for f in features:
        if not 0 <= f < n_features:
            raise ValueError(f"feature {f} out of range: this SAE has {n_features} features (0-{n_features - 1})")
    return features


def render() -> None:
    st.title("Steering")
    try:
        settings = app_settings()
        folder = selected_sae(settings)
        index = feature_index(folder)
    except (ValueError, FileNotFoundError) as error:
        show_error(error)
        return
    with st.form("steer"):
        cols = st.columns([2, 1, 1, 1])
        features_text = cols[0].text_input("features", value=st.query_params.get("feature", ""))
        value_text = cols[1].text_input("value", "8x", help="absolute (3.5) or × the feature's max activation (8x)")
        mode = cols[2].selectbox("mode", MODES)
        positions = cols[3].selectbox("positions", POSITIONS, index=2)
        prompt = st.text_area("prompt", "The function returns", height=80)
        cols = st.columns(6)
        chat = cols[0].checkbox("chat template")
        seed = cols[1].number_input("seed", 0, 2**31 - 1, 0)
        temperature = cols[2].number_input("temperature", 0.0, 5.0, 0.5, step=0.1)
        top_p = cols[3].number_input("top-p", 0.01, 1.0, 0.9, step=0.05)
        max_new = cols[4].number_input("max new tokens", 1, 256, 40)
        sweep_text = cols[5].text_input("sweep (optional)", "", help="values for a sweep, e.g. 0,2x,4x,8x")
        submitted = st.form_submit_button("Generate", type="primary")
    if not submitted:
        return
    try:
        features = parse_features(features_text, index.n_features)
        strengths = [Strength.parse(v) for v in (sweep_text.split(",") if sweep_text.strip() else [value_text])]
        if not prompt.strip() and not chat:
            raise ValueError("the prompt is empty: give some text to continue")
        sampling = SamplingConfig(int(max_new), float(temperature), float(top_p), int(seed))
        scales = {f: FeatureScale(*typical) for f, typical in index.typical_activations(features).items()}
        max_acts = {f: scale.max for f, scale in scales.items()}
        specs = [build_spec(features, [s] * len(features), mode, positions, scales) for s in strengths]
    except ValueError as error:
        show_error(error)
        return
    loaded, sae, layer = live_model(str(settings.run), str(folder))
    try:
        ids = encode_prompt(loaded.tokenizer, prompt, chat)
        check_length(len(ids), sampling.max_new_tokens, getattr(loaded.model.config, "max_position_embeddings", None))
    except ValueError as error:
        show_error(error)
        return
    results, default = [], None
    with st.spinner(f"generating ({len(specs) + 1} runs)…"), hook_lock():
        for spec in specs:
            result = compare(loaded.model, sae, layer, spec, ids, sampling, loaded.tokenizer.eos_token_id, default)
            default = result.default.token_ids
            results.append(result)
    decode = lambda t: loaded.tokenizer.decode([t])  # noqa: E731
    if len(specs) == 1:
        side_by_side(specs[0], results[0], decode, max_acts[features[0]])
    else:
        sweep_table(strengths, specs, results, decode, max_acts[features[0]])


def shaded_run(report, feature: int, decode, scale: float) -> str:
    tokens = [decode(t) for t in report.token_ids]
    acts = report.feature_acts[feature]
    titles = [
        f"#{feature} {a:.3f} · log p here {own:.2f} · other condition {other:.2f}"
        for a, own, other in zip(acts, report.logprob_self, report.logprob_other, strict=True)
    ]
    return shade_tokens(tokens, acts, scale, titles=titles)


def side_by_side(spec, result, decode, scale: float) -> None:
    first = spec.steers[0].feature
    left, right = st.columns(2)
    left.subheader("default")
    left.markdown(shaded_run(result.default, first, decode, scale), unsafe_allow_html=True)
    right.subheader("steered: " + ", ".join(f"#{s.feature} {s.mode} {s.value:.3g}" for s in spec.steers))
    right.markdown(shaded_run(result.steered, first, decode, scale), unsafe_allow_html=True)
    st.caption(f"shading: feature #{first} re-encoded without steering; hover a token for its log-probabilities")
    rows = [
        {
            "feature": s.feature,
            "mean activation, default text": result.default.mean_activation(s.feature),
            "mean activation, steered text": result.steered.mean_activation(s.feature),
        }
        for s in spec.steers
    ]
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    st.markdown(
        f"mean KL(default ‖ steered): **{result.default.kl:.3f}** nats on the default text, "
        f"**{result.steered.kl:.3f}** on the steered text"
    )


def sweep_table(strengths, specs, results, decode, scale: float) -> None:
    first = specs[0].steers[0].feature
    rows = [
        {
            "value": strength.text,
            "absolute": spec.steers[0].value,
            "activation": result.steered.mean_activation(first),
            "KL": result.default.kl,
            "generation": "".join(decode(t) for t in result.steered.token_ids),
        }
        for strength, spec, result in zip(strengths, specs, results, strict=True)
    ]
    frame = pd.DataFrame(rows)
    st.markdown("default: " + shaded_run(results[0].default, first, decode, scale), unsafe_allow_html=True)
    st.dataframe(frame, hide_index=True, width="stretch")
    long = frame.melt(id_vars=["absolute"], value_vars=["activation", "KL"], var_name="measure", value_name="amount")
    chart = alt.Chart(long).mark_line(point=True).encode(x="absolute:Q", y="amount:Q", color="measure:N")
    st.altair_chart(chart.properties(height=240), width="stretch")
