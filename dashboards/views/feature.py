"""One feature: statistics, histogram with bin edges, logit effects, top and interval examples, neighbours.

With ``?layer=L`` the page shows a transcoder latent instead (``dashboards.views.transcoder_feature``).
"""

from __future__ import annotations

import html

import altair as alt
import pandas as pd
import streamlit as st

from dashboards.render import (
    bin_edges,
    feature_link,
    feature_links,
    format_density,
    histogram_rows,
    token_label,
    token_spans,
)
from dashboards.resources import (
    app_settings,
    explanations,
    feature_index,
    feature_labels,
    index_token_bytes,
    selected_sae,
    show_error,
)
from dashboards.views import transcoder_feature


def feature_id(text: str | None, n_features: int) -> int:
    """The feature named by the ``id`` query parameter, or a ValueError that says what is wrong."""
    if text is None or not text.strip():
        raise ValueError(f"no feature chosen: add ?id=N to the address (0-{n_features - 1})")
    try:
        feature = int(text)
    except ValueError as error:
        raise ValueError(f"feature id {text!r} is not a number: use 0-{n_features - 1}") from error
    if not 0 <= feature < n_features:
        raise ValueError(f"feature {feature} out of range: this SAE has {n_features} features (0-{n_features - 1})")
    return feature


def render() -> None:
    if st.query_params.get("layer") is not None:
        transcoder_feature.render()  # a transcoder latent (?layer=L): no index, computed live
        return
    try:
        index = feature_index(selected_sae(app_settings()))
        feature = feature_id(st.query_params.get("id"), index.n_features)
    except (ValueError, FileNotFoundError) as error:
        st.title("Feature")
        show_error(error)
        return
    summary = index.summary(feature)
    st.title(f"Feature {feature}" + ("  (dead)" if summary["dead"] else ""))
    folder = selected_sae(app_settings())
    labels = feature_labels(folder, [f for f in (feature - 1, feature, feature + 1) if 0 <= f < index.n_features])
    if labels.get(feature):
        st.html(f'<div class="label" style="font-size:1.1em">{html.escape(labels[feature])}</div>')
    nav = st.columns(4)
    if feature > 0:
        nav[0].html(feature_link(feature - 1, labels.get(feature - 1), text=f"← #{feature - 1}"))
    if feature + 1 < index.n_features:
        nav[1].html(feature_link(feature + 1, labels.get(feature + 1), text=f"#{feature + 1} →"))
    nav[3].link_button("Steer with this feature", f"./steer?feature={feature}", type="primary")
    cols = st.columns(3)
    cols[0].metric("density", format_density(summary["density"]), help=f"{summary['n_active']:,} activations")
    cols[1].metric("max activation", f"{summary['max_act']:.4g}")
    cols[2].metric("mean (when active)", f"{summary['mean_act']:.4g}")
    explanation_panel(feature)
    kind = st.radio("interval bins", ["quantile", "width"], horizontal=True,
                    format_func=lambda k: {"quantile": "equal count", "width": "equal width"}[k])  # fmt: skip
    bins = index.interval_examples(feature, kind)
    left, right = st.columns([3, 2])
    with left:
        histogram(summary["histogram"], bin_edges(bins))
    with right:
        logit_bars(index, feature)
    st.subheader("Top examples")
    top = index.top_examples(feature, 20)
    raw = bytes_lookup(index, [*top, *(e for entry in bins for e in entry["examples"])])
    st.html(examples_html(top, summary["max_act"], raw=raw))
    st.subheader("Interval examples")
    st.html("".join(interval_html(entry, summary["max_act"], raw) for entry in bins))
    st.subheader("Nearest features by decoder cosine")
    neighbours = [(int(n), f" ({c:.2f})") for n, c in summary["neighbours"]]
    st.html(feature_links(neighbours, feature_labels(selected_sae(app_settings()), [n for n, _ in neighbours])))


def bytes_lookup(index, examples) -> dict[int, bytes | None]:
    """token id -> its bytes, for the byte tokens among the examples (empty when there are none)."""
    ids = sorted({t for example in examples for t in example.token_ids})
    raw = index_token_bytes(app_settings(), index, ids)
    return dict(zip(ids, raw, strict=True)) if raw is not None else {}


def explanation_panel(feature: int) -> None:
    """Each explanation of the feature with its scores beside their controls (nothing before `saescope explain`)."""
    reader = explanations(selected_sae(app_settings()))
    if reader is None:
        st.caption("no explanation yet: run `saescope explain` to label features")
        return
    for explanation in reader.for_feature(feature):
        st.html(
            f'<div class="explanation"><b>Explanation</b> ({html.escape(explanation["explainer"])}): '
            f"{html.escape(explanation['text'])}</div>"
        )
        rows = [
            {
                "scorer": score["scorer"],
                "metric": score["metric"],
                "score": round(score["value"], 3),
                "control (another feature's label)": None
                if score["control_value"] is None
                else round(score["control_value"], 3),
                "test examples": f"{score['n_positive']} activating / {score['n_negative']} not",
            }
            for score in explanation["scores"]
        ]
        if rows:
            st.dataframe(rows, hide_index=True, width="stretch")


def examples_html(examples, scale: float, with_values: bool = True, raw: dict | None = None) -> str:
    """One block of shaded examples, each on its own line (one element renders faster than many)."""
    rows = []
    for example in examples:
        value = f'<small style="color:#666">{example.activation:.3f}</small> ' if with_values else ""
        token_raw = [raw.get(t) for t in example.token_ids] if raw and example.token_ids else None
        spans = token_spans(example.tokens, example.acts, scale, example.peak, raw=token_raw)
        rows.append(f'<div class="example">{value}{spans}</div>')
    return "".join(rows)


def interval_html(entry: dict, scale: float, raw: dict | None = None) -> str:
    caption = (
        '<div class="bin" style="color:#666; margin-top: 0.6em">'
        f"activations {entry['lower']:.3g}–{entry['upper']:.3g}: "
        f"{entry['n_activations']:,} in this bin</div>"
    )
    return caption + examples_html(entry["examples"], scale, raw=raw)


def histogram(hist: dict, edges: list[float]) -> None:
    rows = histogram_rows(hist["counts"], hist["bin_width"])
    if not rows:
        st.caption("no activations")
        return
    bars = (
        alt.Chart(pd.DataFrame(rows))
        .mark_bar()
        .encode(
            x=alt.X("low:Q", bin="binned", title="activation"),
            x2="high:Q",
            y=alt.Y("count:Q", title="tokens"),
            tooltip=["low", "high", "count"],
        )
    )
    rules = alt.Chart(pd.DataFrame({"edge": edges})).mark_rule(color="#c03", strokeDash=[3, 3]).encode(x="edge:Q")
    st.altair_chart((bars + rules).properties(height=240), width="stretch")
    st.caption("dashed lines: edges of the interval bins below")


def logit_bars(index, feature: int) -> None:
    ranking = st.radio("rank output tokens by", ["standardized", "raw"], horizontal=True,
                       help="standardized: each token's effect minus its mean over all features, over its "
                       "standard deviation (tokens every feature pushes drop out); raw: W_dec·W_U")  # fmt: skip
    effects = index.logit_tokens(feature, ranking)
    rows = [{**e, "side": side, "rank": i} for side in effects for i, e in enumerate(effects[side])]
    frame = pd.DataFrame(rows)
    raw = index_token_bytes(app_settings(), index, list(frame["token_id"]))
    frame["token"] = [f"'{token_label(t, raw[i] if raw else None)}'" for i, t in enumerate(frame["token"])]
    value = "z" if ranking == "standardized" and frame["z"].notna().all() else "raw"
    chart = (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X(f"{value}:Q", title="z-score" if value == "z" else "raw effect"),
            y=alt.Y("token:N", sort=None, title=None),
            color=alt.Color("side:N", scale=alt.Scale(range=["#2a7", "#c33"]), legend=None),
            tooltip=["token", "raw", "z"],
        )
        .properties(height=24 * len(frame) + 40)
    )
    st.altair_chart(chart, width="stretch")
