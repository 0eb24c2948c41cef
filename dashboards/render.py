"""Plain rendering helpers for the dashboard (no Streamlit): shaded tokens, labels, bins, histograms.

Every token string is HTML-escaped before it is wrapped in markup: corpora and
generations are untrusted text, so ``<script>`` or ``$a+b$`` must render as the
characters they are. Pages put this markup into the page with ``st.html`` only,
never through markdown. ``token_spans`` is the one function that makes a token's
span: its text content is exactly the token's text (a page's visible text equals
the decoded ids); what only helps reading (↵ for a newline, a byte token's
``\\xe2\\x80``) is drawn by CSS from ``data-show`` and is not part of the text.
"""

from __future__ import annotations

import html
import math

from pipeline.lm.token_text import REPLACEMENT, display_text, escaped_bytes, merged_texts

SHADE_RGB = (255, 136, 0)
VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}
TOKEN_CSS = (
    "<style>.tok[data-show]::before{content:attr(data-show);color:#888;font-size:85%}"
    ".tok.ws{outline:1px dotted #bbb;outline-offset:-3px}</style>"
)


def visible_token(token: str) -> str:
    """The token with newlines and tabs shown as symbols, then HTML-escaped."""
    for raw, symbol in VISIBLE.items():
        token = token.replace(raw, symbol)
    return html.escape(token, quote=True)


def token_label(text: str, raw: bytes | None = None) -> str:
    """A token as plain text for tables and charts: its bytes when not whole UTF-8 alone, visible whitespace."""
    return display_text(text, raw)


def shade_alpha(value: float, scale: float) -> float:
    """Background opacity in [0, 1] for an activation: value / scale, clipped; 0 for non-positive values."""
    if not math.isfinite(value) or value <= 0 or scale <= 0:
        return 0.0
    return min(1.0, value / scale)


def _hint(text: str, raw: bytes | None, line_breaks: bool) -> str | None:
    """What CSS draws before a token: its bytes when it holds a partial character, else its line-break symbols."""
    if raw is not None and REPLACEMENT in text:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return escaped_bytes(raw)
    symbols = "".join(VISIBLE[c] for c in text if c in VISIBLE) if line_breaks else ""
    return symbols or None


def token_span(text: str, shown: str, style: str, title: str, act: float, hint: str | None) -> str:
    """One token's span: ``shown`` (escaped) is its content, ``hint`` is drawn by CSS beside it."""
    cls = "tok ws" if text and not text.strip(" ") else "tok"
    show = f' data-show="{html.escape(hint, quote=True)}"' if hint else ""
    return (
        f'<span class="{cls}" data-act="{act:.4g}"{show} title="{html.escape(title, quote=True)}" '
        f'style="{style} white-space: pre-wrap; border-radius: 2px;">{html.escape(shown, quote=True)}</span>'
    )


def token_spans(
    tokens: list[str],
    acts: list[float],
    scale: float,
    peak: int | None = None,
    titles: list[str] | None = None,
    raw: list[bytes | None] | None = None,
    line_breaks: bool = False,
) -> str:
    """Tokens on backgrounds as strong as their activations (relative to ``scale``), in one element.

    ``raw`` (per token, its bytes or None) lets a run of byte tokens carry its merged character;
    with ``line_breaks`` a newline breaks the line (generations), else it shows as ↵ (one-line examples).
    Hovering a token shows its activation (or ``titles[i]``); the ``peak`` token is outlined.
    """
    texts = merged_texts(tokens, raw)
    parts = []
    for i, (token, act) in enumerate(zip(tokens, acts, strict=True)):
        alpha = shade_alpha(act, scale)
        style = f"background: rgba({SHADE_RGB[0]},{SHADE_RGB[1]},{SHADE_RGB[2]},{alpha:.3f});"
        if i == peak:
            style += " outline: 2px solid #c03; font-weight: 600;"
        title = titles[i] if titles is not None else f"{act:.3f}"
        token_raw = raw[i] if raw is not None else None
        hint = _hint(token, token_raw, line_breaks)
        shown = texts[i] if line_breaks else visible_token_text(texts[i])
        if texts[i] != token:
            title = f"{title} · text here: {texts[i]!r}" if texts[i] else f"{title} · part of the next character"
        parts.append(token_span(token, shown, style, title, act, hint))
    return (
        TOKEN_CSS
        + '<span class="tokens" style="font-family: monospace; line-height: 1.9;">'
        + "".join(parts)
        + "</span>"
    )


def visible_token_text(text: str) -> str:
    """The text with newlines and tabs replaced by their symbols (not escaped)."""
    for raw, symbol in VISIBLE.items():
        text = text.replace(raw, symbol)
    return text


def shade_tokens(
    tokens: list[str],
    acts: list[float],
    scale: float,
    peak: int | None = None,
    titles: list[str] | None = None,
) -> str:
    """One line of shaded tokens (newlines shown as ↵): ``token_spans`` without bytes or line breaks."""
    return token_spans(tokens, acts, scale, peak, titles)


def text_html(text: str, tag: str = "span", style: str = "") -> str:
    """Plain text (a label, a prompt) as escaped HTML: never interpreted as markdown or markup."""
    attr = f' style="{html.escape(style, quote=True)}"' if style else ""
    return f"<{tag}{attr}>{html.escape(text, quote=False)}</{tag}>"


def feature_link(feature: int, label: str | None, extra: str = "", text: str | None = None) -> str:
    """A link to a feature's page (``#id`` + ``extra``, or ``text``) whose hover carries its label."""
    title = html.escape(label or "no label yet", quote=True)
    text = text if text is not None else f"#{feature}{extra}"
    return f'<a href="./feature?id={int(feature)}" target="_self" title="{title}">{html.escape(text)}</a>'


def feature_links(features: list[tuple[int, str]], labels: dict[int, str], sep: str = " · ") -> str:
    """Links to features (id, extra text) with their labels on hover and, short, beside them."""
    parts = []
    for feature, extra in features:
        label = labels.get(feature)
        beside = f' <small style="color:#666">{html.escape(short(label))}</small>' if label else ""
        parts.append(feature_link(feature, label, extra) + beside)
    return '<div class="feature-links">' + html.escape(sep).join(parts) + "</div>"


def short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
