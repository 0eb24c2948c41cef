"""Plain rendering helpers for the dashboard (no Streamlit): shaded tokens, bins, histograms.

Every token string is HTML-escaped before it is wrapped in markup: corpora are
untrusted text, so ``<script>`` in a corpus must render as the characters it is.
"""

from __future__ import annotations

import html
import math

SHADE_RGB = (255, 136, 0)
VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def visible_token(token: str) -> str:
    """The token with newlines and tabs shown as symbols, then HTML-escaped."""
    for raw, symbol in VISIBLE.items():
        token = token.replace(raw, symbol)
    return html.escape(token, quote=True)


def shade_alpha(value: float, scale: float) -> float:
    """Background opacity in [0, 1] for an activation: value / scale, clipped; 0 for non-positive values."""
    if not math.isfinite(value) or value <= 0 or scale <= 0:
        return 0.0
    return min(1.0, value / scale)


def shade_tokens(
    tokens: list[str],
    acts: list[float],
    scale: float,
    peak: int | None = None,
    titles: list[str] | None = None,
) -> str:
    """One line of tokens, each on a background as strong as its activation (relative to ``scale``).

    Hovering a token shows its activation (or ``titles[i]``); the ``peak`` token is outlined.
    """
    parts = []
    for i, (token, act) in enumerate(zip(tokens, acts, strict=True)):
        alpha = shade_alpha(act, scale)
        style = f"background: rgba({SHADE_RGB[0]},{SHADE_RGB[1]},{SHADE_RGB[2]},{alpha:.3f});"
        if i == peak:
            style += " outline: 2px solid #c03; font-weight: 600;"
        title = titles[i] if titles is not None else f"{act:.3f}"
        parts.append(
            f'<span class="tok" data-act="{act:.4g}" title="{html.escape(title, quote=True)}" '
            f'style="{style} white-space: pre; border-radius: 2px;">{visible_token(token)}</span>'
        )
    return '<span class="tokens" style="font-family: monospace; line-height: 1.9;">' + "".join(parts) + "</span>"


def bin_edges(bins: list[dict]) -> list[float]:
    """Sorted distinct edges of interval bins (each a dict with ``lower`` and ``upper``)."""
    edges = {float(b["lower"]) for b in bins} | {float(b["upper"]) for b in bins}
    return sorted(edges)


def histogram_rows(counts: list[int], bin_width: float) -> list[dict]:
    """Rows for a bar chart of an activation histogram whose bins start at 0."""
    return [{"low": i * bin_width, "high": (i + 1) * bin_width, "count": int(count)} for i, count in enumerate(counts)]


def format_density(density: float) -> str:
    """A firing frequency as a percentage, readable from 100% down to one in a million."""
    if density <= 0:
        return "0 (dead)"
    return f"{100 * density:.3g}%"


def link(path: str, label: str, **params) -> str:
    """A markdown link to another page of the app (relative, so it works behind any base URL)."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"[{label}](./{path}{'?' + query if query else ''})"
