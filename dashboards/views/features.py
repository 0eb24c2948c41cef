"""Features: a sortable, filterable, paged table; search by token; jump to an id; a random live feature."""

from __future__ import annotations

import random

import pandas as pd
import streamlit as st

from dashboards.render import feature_link, format_density, token_label
from dashboards.resources import (
    app_settings,
    embedder,
    explanations,
    feature_index,
    feature_labels,
    index_token_bytes,
    selected_sae,
    show_error,
)
from storage.index_queries import SORT_COLUMNS, Example

PAGE_SIZE = 50


def snippet(example: Example | None, width: int = 6) -> str:
    """A few tokens around the example's peak, the peak token in «brackets»."""
    if example is None:
        return ""
    lo, hi = max(0, example.peak - width), example.peak + width + 1
    parts = [f"«{t}»" if i == example.peak else t for i, t in enumerate(example.tokens) if lo <= i < hi]
    return token_label("".join(parts))


def promoted_labels(index, rows: list[dict]) -> dict[int, str]:
    """token id -> how a table shows it (quoted; a byte token as its bytes), for the rows' promoted tokens."""
    ids = sorted({t for row in rows for t in row.get("promoted_ids", [])})
    raw = index_token_bytes(app_settings(), index, ids)
    return {t: "'" + token_label(index.vocab_text(t), raw[i] if raw else None) + "'" for i, t in enumerate(ids)}


def table(index, rows: list[dict], labels: dict[int, dict] | None = None) -> pd.DataFrame:
    snippets = index.top_snippets([row["feature"] for row in rows])
    labels = labels or {}
    shown = promoted_labels(index, rows)
    return pd.DataFrame(
        [
            {
                "feature": f"./feature?id={row['feature']}",
                **({"similarity": round(row["similarity"], 3)} if "similarity" in row else {}),
                **(
                    {
                        "explanation": labels.get(row["feature"], {}).get("text", ""),
                        "AUROC": labels.get(row["feature"], {}).get("auroc"),
                        "control": labels.get(row["feature"], {}).get("control_auroc"),
                    }
                    if labels
                    else {}
                ),
                "density": format_density(row["density"]),
                "max": row["max_act"],
                "mean": row["mean_act"],
                "promotes": " ".join(shown[t] for t in row["promoted_ids"]),
                "top example": snippet(snippets.get(row["feature"])),
            }
            for row in rows
        ]
    )


def render_meaning(index, reader, query: str) -> None:
    """Features ranked by meaning: the closest PAGE_SIZE to the query."""
    hits = reader.search(embedder().encode([query])[0], limit=PAGE_SIZE)
    stats = index.stats_of([hit["feature"] for hit in hits])
    rows = [{**stats[hit["feature"]], "similarity": hit["similarity"]} for hit in hits]
    st.caption(f"{len(rows)} features closest in meaning to {query!r}")
    labels = reader.labels([row["feature"] for row in rows])
    st.dataframe(
        table(index, rows, labels),
        hide_index=True,
        width="stretch",
        column_config={"feature": st.column_config.LinkColumn("feature", display_text=r"id=(\d+)")},
    )


def render() -> None:
    st.title("Features")
    try:
        index = feature_index(selected_sae(app_settings()))
    except (ValueError, FileNotFoundError) as error:
        show_error(error)
        return
    top = st.columns([2, 1, 1, 1])
    jump = top[1].number_input("go to feature", 0, index.n_features - 1, step=1, value=None)
    chosen = index.random_live(random.randrange(1 << 30))
    named = feature_labels(selected_sae(app_settings()), [f for f in (jump, chosen) if f is not None])
    if jump is not None:
        top[1].html(feature_link(int(jump), named.get(int(jump)), text=f"open #{int(jump)}"))
    if chosen is not None:
        top[2].html(feature_link(chosen, named.get(chosen), text="random live feature"))
    search = top[0].text_input(
        "search by token",
        key="search",
        help="features whose top examples or promoted tokens include this token (case and surrounding spaces ignored)",
    )
    reader = explanations(selected_sae(app_settings()))
    meaning = st.text_input(
        "search by meaning",
        key="meaning",
        disabled=reader is None,
        placeholder="e.g. file paths" if reader else "run `saescope explain` first",
        help="ranks features by MiniLM cosine of your words with their explanation and top examples",
    )
    if reader is not None and meaning.strip():
        render_meaning(index, reader, meaning)
        return
    cols = st.columns(5)
    sort = cols[0].selectbox("sort by", list(SORT_COLUMNS), index=0)
    ascending = cols[1].toggle("ascending", value=False)
    only = cols[2].radio("show", ["all", "live", "dead"], horizontal=True, index=1)
    min_pct = cols[3].number_input("min density %", 0.0, 100.0, 0.0, format="%.4f")
    max_pct = cols[4].number_input("max density %", 0.0, 100.0, 100.0, format="%.4f")
    if min_pct > max_pct:
        st.error("min density is above max density")
        return
    dead = {"all": None, "live": False, "dead": True}[only]
    page = st.number_input("page", 1, max(1, -(-index.n_features // PAGE_SIZE)), 1) if not search else 1
    token = search if search.strip() else None
    offset = (page - 1) * PAGE_SIZE
    rows = index.list_features(sort, not ascending, dead, min_pct / 100, max_pct / 100, PAGE_SIZE, offset, token=token)
    if search:
        st.caption(f"{len(rows)} features match {search!r}")
    if not rows:
        st.info("no feature matches these filters")
        return
    labels = reader.labels([row["feature"] for row in rows]) if reader is not None else None
    st.dataframe(
        table(index, rows, labels),
        hide_index=True,
        width="stretch",
        column_config={"feature": st.column_config.LinkColumn("feature", display_text=r"id=(\d+)")},
    )
