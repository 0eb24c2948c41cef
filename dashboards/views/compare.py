"""Compare two SAEs of the run (``/compare?a=A&b=B``): PW-MCC beside its control, matched pairs, split families.

The page reads what `saescope compare` saved (``RUN/comparisons/A__B.json``, or ``B__A.json`` with
the sides swapped) and uses it only while both SAEs' weight fingerprints still match; otherwise
it shows the command that computes it. Labels are untrusted text: they appear only as plain
dataframe cells.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pandas as pd
import streamlit as st

from dashboards.resources import app_settings, explanations, sae_names, show_error
from storage.comparisons import comparison_path, read_comparison
from storage.sae_store import sae_dir, weights_fingerprint

LINK_COLUMN = {"display_text": r"id=(\d+)"}


def swapped(result: dict) -> dict:
    """The same comparison seen from the other side (B as A)."""
    pairs, splits = result["pairs"], result["splits"]
    return {
        **result,
        "a": result["b"],
        "b": result["a"],
        "pairs": {"a": pairs["b"], "b": pairs["a"], "cosine": pairs["cosine"]},
        "splits": {**splits, "parent_side": "b" if splits["parent_side"] == "a" else "a"},
    }


def saved_comparison(run: Path, a: str, b: str) -> dict | None:
    """The saved comparison of SAEs ``a`` and ``b`` (either order), if it matches their current weights."""
    wanted = (weights_fingerprint(sae_dir(run, a)), weights_fingerprint(sae_dir(run, b)))
    for first, second, flip in ((a, b, False), (b, a, True)):
        result = read_comparison(comparison_path(run, first, second))
        if result is None:
            continue
        result = swapped(result) if flip else result
        if (result["a"].get("fingerprint"), result["b"].get("fingerprint")) == wanted:
            return result
    return None


def feature_link(feature: int, sae: str) -> str:
    return f"./feature?id={int(feature)}&sae={quote(sae)}"


def pair_rows(result: dict, labels_a: dict, labels_b: dict) -> pd.DataFrame:
    """One row per matched pair, highest decoder cosine first: links, labels, cosine, correlation."""
    pairs, name_a, name_b = result["pairs"], result["a"]["name"], result["b"]["name"]
    corr = (result.get("correlation") or {}).get("per_pair") or [None] * len(pairs["a"])
    order = sorted(range(len(pairs["a"])), key=lambda i: -pairs["cosine"][i])
    return pd.DataFrame(
        [
            {
                "A": feature_link(pairs["a"][i], name_a),
                "A label": labels_a.get(pairs["a"][i], ""),
                "B": feature_link(pairs["b"][i], name_b),
                "B label": labels_b.get(pairs["b"][i], ""),
                "cosine": pairs["cosine"][i],
                "correlation": corr[i],
            }
            for i in order
        ]
    )


def family_rows(result: dict, labels_parent: dict, labels_child: dict) -> pd.DataFrame:
    """One row per split family: the parent (link, label), its size and its children with cosines and labels."""
    splits = result["splits"]
    parent_sae, child_sae = (result["a"], result["b"]) if splits["parent_side"] == "a" else (result["b"], result["a"])
    rows = []
    for family in splits["families"]:
        children = zip(family["children"], family["cosines"], strict=True)
        rows.append({
            "parent": feature_link(family["parent"], parent_sae["name"]),
            "parent label": labels_parent.get(family["parent"], ""),
            "size": len(family["children"]),
            f"children in {child_sae['name']}": " · ".join(
                f"#{c} ({cos:.2f}) {labels_child.get(c, '')}".rstrip() for c, cos in children
            ),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _labels(folder: Path, features: list[int]) -> dict[int, str]:
    reader = explanations(folder)
    if reader is None or not features:
        return {}
    return {feature: row["text"] for feature, row in reader.labels(features).items()}


def _chosen(names: list[str]) -> tuple[str, str]:
    """SAEs A and B from ?a= and ?b= (default: the first two), chosen again with two select boxes."""
    wanted_a = st.query_params.get("a")
    a_default = names.index(wanted_a) if wanted_a in names else 0
    wanted_b = st.query_params.get("b")
    b_default = names.index(wanted_b) if wanted_b in names else (1 if a_default == 0 else 0)
    left, right = st.columns(2)
    a = left.selectbox("SAE A", names, index=a_default)
    b = right.selectbox("SAE B", names, index=b_default)
    st.query_params["a"], st.query_params["b"] = a, b
    return a, b


def summary(result: dict) -> None:
    """PW-MCC beside its control, strong pairs, correlation, split families."""
    cols = st.columns(6)
    n_pairs = len(result["pairs"]["a"])
    cols[0].metric("PW-MCC", f"{result['pw_mcc']:.3f}", help="mean decoder cosine of the matched pairs")
    cols[1].metric("control", f"{result['control_pw_mcc']:.3f}", help="PW-MCC against an untrained SAE of B's shape")
    for col, (cosine, count) in zip(cols[2:4], result["pairs_at_least"].items(), strict=True):
        col.metric(f"pairs ≥ {cosine}", f"{count:,}", help=f"of {n_pairs:,} matched pairs")
    corr = result.get("correlation") or {}
    mean = corr.get("mean")
    tokens = f"Pearson, matched pairs' activations on {corr.get('n_tokens', 0):,} held-out tokens"
    cols[4].metric("mean correlation", "–" if mean is None else f"{mean:.3f}", help=tokens)
    cols[5].metric("split families", f"{len(result['splits']['families']):,}")


def render() -> None:
    st.title("Compare SAEs")
    try:
        settings = app_settings()
        names = sae_names(settings)
    except ValueError as error:
        show_error(error)
        return
    if len(names) < 2:
        st.info("This run holds one SAE: train another (e.g. another seed or k) to compare them.")
        return
    a, b = _chosen(names)
    if a == b:
        st.error("Choose two different SAEs.")
        return
    try:
        result = saved_comparison(settings.run, a, b)
    except ValueError as error:
        show_error(error)
        return
    if result is None:
        st.info("No comparison of these two SAEs for their current weights yet. Compute it with:")
        st.code(f"saescope compare --run {settings.run} --sae {a} --sae {b}", language="bash")
        return
    summary(result)
    folder_a, folder_b = sae_dir(settings.run, a), sae_dir(settings.run, b)
    labels_a = _labels(folder_a, list(range(result["a"]["d_sae"])))
    labels_b = _labels(folder_b, list(range(result["b"]["d_sae"])))
    st.subheader("Matched pairs")
    links = {"A": st.column_config.LinkColumn("A", **LINK_COLUMN), "B": st.column_config.LinkColumn("B", **LINK_COLUMN)}
    st.dataframe(pair_rows(result, labels_a, labels_b), hide_index=True, width="stretch", column_config=links)
    st.subheader("Split families")
    parent_first = result["splits"]["parent_side"] == "a"
    labels_parent, labels_child = (labels_a, labels_b) if parent_first else (labels_b, labels_a)
    families = family_rows(result, labels_parent, labels_child)
    if families.empty:
        st.caption("no latent of the smaller SAE has two or more close latents in the larger one")
        return
    st.dataframe(families, hide_index=True, width="stretch",
                 column_config={"parent": st.column_config.LinkColumn("parent", **LINK_COLUMN)})  # fmt: skip
