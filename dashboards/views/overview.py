"""Overview: what the run is, how good its SAE is, how it trained, how its features are spread."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from dashboards.resources import app_settings, feature_index, sae_names, selected_sae, show_error
from storage.sae_store import SaeRecord, sae_dir
from storage.train_log import read_log

METRIC_LABELS = {
    "fvu": "FVU",
    "pca_fvu": "PCA FVU (same L0)",
    "explained_variance": "explained variance",
    "fvu_without_outliers": "FVU w/o outliers",
    "pca_fvu_without_outliers": "PCA FVU w/o outliers",
    "l0": "L0",
    "dead_fraction": "dead fraction",
    "ce_loss_recovered": "CE-loss recovered",
    "delta_lm_loss": "delta LM loss (nats)",
    "kl_spliced": "KL (nats)",
}


def metrics_of(folder: Path) -> dict:
    return SaeRecord.read(folder).metrics


def metrics_row(run: Path, name: str) -> dict:
    metrics = metrics_of(sae_dir(run, name))
    return {"SAE": name, **{label: metrics.get(key) for key, label in METRIC_LABELS.items()}}


def training_log(folder: Path) -> pd.DataFrame:
    return pd.DataFrame(read_log(folder))


def render() -> None:
    st.title("Overview")
    try:
        settings = app_settings()
        names = sae_names(settings)
        if not names:
            st.error(f"{settings.run} has no trained SAE yet: run `saescope train --run {settings.run}`")
            return
        folder = selected_sae(settings)
    except ValueError as error:
        show_error(error)
        return
    if len(names) > 1:
        choice = st.selectbox("SAE", names, index=names.index(folder.name))
        if choice != folder.name:
            st.query_params["sae"] = choice
            st.rerun()
        st.dataframe(pd.DataFrame([metrics_row(settings.run, name) for name in names]), hide_index=True)
        show_frontier(settings.run, names)
    describe(folder)
    show_metrics(metrics_of(folder))
    show_training(training_log(folder))
    show_features(folder)


def show_frontier(run: Path, names: list[str]) -> None:
    """The L0-FVU frontier: one point per SAE of the run with metrics, each a link to that SAE's overview."""
    rows = []
    for name in names:
        metrics = metrics_of(sae_dir(run, name))
        if metrics.get("l0") is not None and metrics.get("fvu") is not None:
            rows.append(
                {
                    "SAE": name,
                    "L0": metrics["l0"],
                    "FVU": metrics["fvu"],
                    "PCA FVU": metrics.get("pca_fvu"),
                    "dead fraction": metrics.get("dead_fraction"),
                    "url": f"./overview?sae={name}",
                }
            )
    if len(rows) < 2:
        return
    frame = pd.DataFrame(rows)
    x_scale = alt.Scale(type="log") if (frame["L0"] > 0).all() else alt.Scale()
    chart = (
        alt.Chart(frame)
        .mark_circle(size=90)
        .encode(
            x=alt.X("L0:Q", scale=x_scale, title="L0 (active latents per token)"),
            y=alt.Y("FVU:Q", title="FVU (held out)"),
            href="url:N",
            tooltip=["SAE", "L0", "FVU", "PCA FVU", "dead fraction"],
        )
        .properties(height=280)
    )
    st.caption("L0-FVU frontier of this run's SAEs (lower left is better); click a point to open that SAE")
    st.altair_chart(chart, width="stretch")


def describe(folder: Path) -> None:
    sae = SaeRecord.read(folder)
    cfg, meta, training = sae.cfg, sae.meta, sae.training
    k = f", k {cfg['k']}" if "k" in cfg else ""
    st.markdown(
        f"**Model** {meta.get('model_name', '?')} · **hook** `{meta.get('hook_name', '?')}` · "
        f"**SAE** `{folder.name}`: {sae.trained_architecture}, "
        f"d_in {cfg.get('d_in')}, d_sae {cfg.get('d_sae')}{k}"
    )
    if training:
        st.caption(
            f"trained on {training.get('tokens_trained', training.get('tokens', '?')):,} tokens, "
            f"batch {training.get('batch_size')}, lr {training.get('lr')}, compute {training.get('dtype')}, "
            f"seed {training.get('seed')}, corpus: {meta.get('dataset_path', '?')}"
        )


def show_metrics(metrics: dict) -> None:
    if not metrics:
        st.info("no metrics recorded for this SAE: run `saescope eval`")
        return
    cols = st.columns(4)
    cols[0].metric("FVU", f"{metrics.get('fvu', float('nan')):.4f}", help="fraction of variance unexplained")
    cols[0].caption(f"PCA baseline at the same L0: {metrics.get('pca_fvu', float('nan')):.4f}")
    cols[1].metric("explained variance", f"{metrics.get('explained_variance', float('nan')):.4f}")
    cols[1].caption(
        f"without {metrics.get('outlier_tokens', 0)} outlier tokens: FVU "
        f"{metrics.get('fvu_without_outliers', float('nan')):.4f} "
        f"(PCA {metrics.get('pca_fvu_without_outliers', float('nan')):.4f})"
    )
    cols[2].metric("L0", f"{metrics.get('l0', float('nan')):.1f}")
    window = metrics.get("dead_window_tokens")
    dead = metrics.get("dead_fraction", 0.0)
    cols[2].caption(
        f"dead {100 * dead:.2f}% (no activation in the last {window:,} training tokens)"
        if window
        else "dead fraction: not recorded"
    )
    if "ce_loss_recovered" in metrics:
        cols[3].metric("CE-loss recovered", f"{metrics['ce_loss_recovered']:.4f}")
        cols[3].caption(
            f"delta LM loss {metrics['delta_lm_loss']:+.4f} nats, KL {metrics['kl_spliced']:.4f} "
            "(zero-ablation baseline)"
        )


def show_training(log: pd.DataFrame) -> None:
    if log.empty or "tokens" not in log:
        return
    st.subheader("Training")
    cols = st.columns(3)
    for col, name in zip(cols, ("loss", "fvu", "dead_fraction"), strict=True):
        if name in log:
            scale = alt.Scale(type="log") if name == "loss" and (log[name] > 0).all() else alt.Scale()
            chart = (
                alt.Chart(log)
                .mark_line()
                .encode(x=alt.X("tokens:Q", title="training tokens"), y=alt.Y(f"{name}:Q", scale=scale, title=name))
            )
            col.caption(name.replace("_", " ") + (" (log scale)" if name == "loss" else ""))
            col.altair_chart(chart.properties(height=200), width="stretch")


def show_features(folder: Path) -> None:
    st.subheader("Features")
    try:
        overview = feature_index(folder).overview()
    except (ValueError, FileNotFoundError) as error:
        show_error(error)
        return
    n, dead = overview["n_features"], overview["n_dead"]
    hist = pd.DataFrame(overview["density_histogram"])
    dense = int(hist.loc[hist["bin_low"] >= -1, "n_features"].sum()) if "bin_low" in hist else 0
    st.markdown(f"{n:,} features: **{n - dead:,} live**, {dead:,} dead, {dense:,} dense (fire on >10% of tokens)")
    if not hist.empty:
        chart = (
            alt.Chart(hist)
            .mark_bar()
            .encode(
                x=alt.X("bin_low:Q", title="log10 firing frequency", bin="binned"),
                x2="bin_high:Q",
                y=alt.Y("n_features:Q", title="live features"),
                tooltip=["bin_low", "bin_high", "n_features"],
            )
            .properties(height=220)
        )
        st.altair_chart(chart, width="stretch")
