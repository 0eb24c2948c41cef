"""Steering: a sweep of strengths relative to the feature's typical activation, or one value side by side.

The first action is the sweep: a chart of KL and the feature's re-encoded
activation against strength, and every generation readable below it, so a
person sees where the text still reads and where the concept appears.
Generations are rendered as HTML through ``render.token_spans``, never markdown.
"""

from __future__ import annotations

import html

import altair as alt
import pandas as pd
import streamlit as st

from dashboards.render import feature_link, format_density, text_html, token_label, token_spans
from dashboards.resources import (
    app_settings,
    feature_index,
    feature_labels,
    hook_lock,
    live_model,
    selected_sae,
    show_error,
)
from pipeline.lm.packing import encode_prompt
from pipeline.lm.token_text import vocab_bytes
from pipeline.steering.edit import MODES, POSITIONS, FeatureScale, Strength, build_spec
from pipeline.steering.generation import SamplingConfig, check_length, sweep

DEFAULT_VALUE = "4xmean"
DEFAULT_SWEEP = "0, 1xmean, 2xmean, 4xmean, 8xmean, 16xmean"
STRENGTH_HELP = "absolute (3.5), × the feature's mean activation when active (4xmean), or × its max activation (1x)"


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


def parse_strengths(text: str) -> list[Strength]:
    return [Strength.parse(part.strip()) for part in text.split(",") if part.strip()]


def header_html(index, features: list[int], labels: dict[int, str]) -> str:
    """Each feature's id (linked), label, density, max and mean activation."""
    rows = []
    for f in features:
        stats = index.summary(f)
        label = labels.get(f)
        rows.append(
            f"<div>{feature_link(f, label)} <b>{html.escape(label or 'no label yet')}</b> "
            f'<span style="color:#666">· density {format_density(stats["density"])} · max {stats["max_act"]:.3g} '
            f"· mean when active {stats['mean_act']:.3g}</span></div>"
        )
    return "".join(rows)


def render() -> None:
    st.title("Steering")
    try:
        settings = app_settings()
        folder = selected_sae(settings)
        index = feature_index(folder)
    except (ValueError, FileNotFoundError) as error:
        show_error(error)
        return
    form = steering_form()
    shown = form["features_text"]
    try:
        header_features = parse_features(shown, index.n_features) if shown.strip() else []
    except ValueError:
        header_features = []
    if header_features:
        st.html(header_html(index, header_features, feature_labels(folder, header_features)))
    if form["action"] is None:
        return
    try:
        features = parse_features(form["features_text"], index.n_features)
        single = Strength.parse(form["value_text"].strip())
        strengths = [single] if form["action"] == "generate" else parse_strengths(form["sweep_text"])
        if not strengths:
            raise ValueError("give the sweep at least one value, e.g. 0, 2xmean, 4xmean")
        if not form["prompt"].strip() and not form["chat"]:
            raise ValueError("the prompt is empty: give some text to continue")
        scales = {f: FeatureScale(*typical) for f, typical in index.typical_activations(features).items()}
        specs = [build_spec(features, [s] * len(features), form["mode"], form["positions"], scales) for s in strengths]
    except ValueError as error:
        show_error(error)
        return
    run_and_show(settings, folder, form, strengths, specs, scales)


def steering_form() -> dict:
    """The form's values and which button was pressed ("sweep", "generate" or None)."""
    with st.form("steer"):
        cols = st.columns([2, 1, 1, 1])
        values = {"features_text": cols[0].text_input("features", value=st.query_params.get("feature", ""))}
        values["value_text"] = cols[1].text_input("value", DEFAULT_VALUE, help=STRENGTH_HELP)
        values["mode"] = cols[2].selectbox("mode", MODES)
        values["positions"] = cols[3].selectbox("positions", POSITIONS, index=2)
        values["prompt"] = st.text_area("prompt", "The function returns", height=80)
        cols = st.columns(6)
        values["chat"] = cols[0].checkbox("chat template")
        values["seed"] = cols[1].number_input("seed", 0, 2**31 - 1, 0)
        values["temperature"] = cols[2].number_input("temperature", 0.0, 5.0, 0.5, step=0.1)
        values["top_p"] = cols[3].number_input("top-p", 0.01, 1.0, 0.9, step=0.05)
        values["max_new"] = cols[4].number_input("max new tokens", 1, 256, 40)
        values["sweep_text"] = cols[5].text_input("sweep values", DEFAULT_SWEEP, help=STRENGTH_HELP)
        buttons = st.columns([1, 1, 4])
        sweep = buttons[0].form_submit_button("Sweep strengths", type="primary", key="sweep")
        generate = buttons[1].form_submit_button("Generate at value", key="generate")
    values["action"] = "sweep" if sweep else "generate" if generate else None
    return values


def run_and_show(settings, folder, form: dict, strengths, specs, scales) -> None:
    """Generate once without steering and once per spec (same seed), then show them."""
    try:
        sampling = SamplingConfig(int(form["max_new"]), float(form["temperature"]), float(form["top_p"]),
                                  int(form["seed"]))  # fmt: skip
        loaded, sae, point = live_model(str(settings.run), str(folder))
        ids = encode_prompt(loaded.tokenizer, form["prompt"], form["chat"])
        check_length(len(ids), sampling.max_new_tokens, getattr(loaded.model.config, "max_position_embeddings", None))
    except ValueError as error:
        show_error(error)
        return
    with st.spinner(f"generating ({len(specs) + 1} runs)…"), hook_lock():
        results = sweep(loaded.model, sae, point, specs, ids, sampling, loaded.tokenizer.eos_token_id)
    tokenizer = loaded.tokenizer
    first = specs[0].steers[0].feature
    scale = scales[first].max
    if form["action"] == "generate":
        side_by_side(specs[0], results[0], tokenizer, scale)
    else:
        sweep_view(strengths, specs, results, tokenizer, scale)


def generation_html(report, feature: int, tokenizer, scale: float, role: str) -> str:
    """A generation's tokens shaded by the feature, in a container that names the ids it shows."""
    tokens = [tokenizer.decode([t]) for t in report.token_ids]
    acts = report.feature_acts[feature]
    titles = [
        f"#{feature} {a:.3f} · log p here {own:.2f} · other condition {other:.2f}"
        for a, own, other in zip(acts, report.logprob_self, report.logprob_other, strict=True)
    ]
    spans = token_spans(tokens, acts, scale, titles=titles, raw=vocab_bytes(tokenizer, report.token_ids),
                        line_breaks=True)  # fmt: skip
    ids = ",".join(str(t) for t in report.token_ids)
    return f'<div class="generation" data-role="{html.escape(role)}" data-ids="{ids}">{spans}</div>'


def side_by_side(spec, result, tokenizer, scale: float) -> None:
    first = spec.steers[0].feature
    left, right = st.columns(2)
    left.subheader("default")
    with left:
        st.html(generation_html(result.default, first, tokenizer, scale, "default"))
    right.subheader("steered: " + ", ".join(f"#{s.feature} {s.mode} {s.value:.3g}" for s in spec.steers))
    with right:
        st.html(generation_html(result.steered, first, tokenizer, scale, "steered"))
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


def plain(tokenizer, token_ids: list[int]) -> str:
    """A generation as one plain string for a table cell, newlines shown as ↵."""
    return token_label(tokenizer.decode(token_ids)) if token_ids else ""


def sweep_view(strengths, specs, results, tokenizer, scale: float) -> None:
    first = specs[0].steers[0].feature
    rows = [
        {
            "value": strength.text,
            "absolute": spec.steers[0].value,
            "activation": result.steered.mean_activation(first),
            "KL": result.default.kl,
            "generation": plain(tokenizer, result.steered.token_ids),
        }
        for strength, spec, result in zip(strengths, specs, results, strict=True)
    ]
    frame = pd.DataFrame(rows)
    long = frame.melt(id_vars=["value"], value_vars=["activation", "KL"], var_name="measure", value_name="amount")
    chart = (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=alt.X("value:N", sort=list(frame["value"]), title="strength"),
            y=alt.Y("amount:Q", title="KL (nats) / re-encoded activation"),
            color="measure:N",
            tooltip=["value", "measure", "amount"],
        )
    )
    st.altair_chart(chart.properties(height=240), width="stretch")
    st.caption(
        f"activation: feature #{first}'s mean activation on the steered text, re-encoded without steering; "
        "KL: mean KL(default ‖ steered) on the default text"
    )
    st.dataframe(frame, hide_index=True, width="stretch")
    st.subheader("default")
    st.html(generation_html(results[0].default, first, tokenizer, scale, "default"))
    for strength, spec, result in zip(strengths, specs, results, strict=True):
        st.html(
            text_html(f"{strength.text} (clamp to {spec.steers[0].value:.3g})", "h4", "margin: 0.8em 0 0.2em")
            + generation_html(result.steered, first, tokenizer, scale, f"steered {strength.text}")
        )
