"""One transcoder latent (``/feature?id=F&layer=L[&transcoders=NAME]``): what it writes and where it fires.

When the layer has a current feature index (``saescope index --transcoders``), the page reads
it, as an SAE feature page does: density (and the dense mark), max and mean, the tokens its
decoder row promotes and suppresses standardised per token over the layer's latents, top and
interval examples over the indexed contexts, and the layer's explanation with its scores
beside their controls (after ``saescope explain --transcoders``). Without one the page
computes what it shows, live: the raw direct logit effects of F's decoder row
(``logit_effects`` on that one row, final norm weight folded in) and its top examples: the
model runs over the run's held-out contexts (the cache's last ones, at most ``MAX_CONTEXTS``)
up to block L, the transcoder encodes that layer's MLP input, and the ``TOP_N`` contexts with
the highest peak of F are drawn as token windows shaded by F's activation, then examples from
``N_BINS`` equal-count activation ranges. The codes of a whole layer are kept per (run, set,
layer, weights sha256), so another latent of the same layer, or the same page again, is
instant. Either way a form follows that steers a generation by clamping F at every position
(``dashboards.transcoder_steer``). ``NAME`` defaults to the run's only set. Token text
reaches the page only through ``token_spans`` or ``html.escape``.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import streamlit as st
import torch

from dashboards.render import format_density, token_spans
from dashboards.resources import app_settings, explanations, feature_index, hook_lock, show_error
from dashboards.transcoder_steer import steer_panel
from pipeline.features.decoder_geometry import final_norm_weight, logit_effects, unembedding
from pipeline.features.transcoder_examples import (
    LatentExample,
    LayerCodes,
    interval_examples,
    latent_examples,
    layer_codes,
)
from pipeline.lm.models import load_model
from pipeline.lm.packing import special_mask
from pipeline.lm.token_text import REPLACEMENT, vocab_bytes
from pipeline.sae.transcoder_format import transcoder_from_saelens
from storage.constants import FEATURE_INDEX
from storage.home import converted_models_dir
from storage.index_queries import FeatureIndex, FeatureIndexError
from storage.sae_store import read_sae_cfg, weights_fingerprint
from storage.shards import activations_dir, read_manifest
from storage.training_data import last_context_tokens
from storage.transcoder_store import layer_dir, load_layer_files, read_set, resolve_set

MAX_CONTEXTS = 64
"""Held-out contexts the top examples are drawn from."""
TOP_N = 10
WINDOW = 16
"""Tokens shown either side of an example's peak."""
BATCH_CONTEXTS = 8
N_BINS = 5
PER_BIN = 3


@dataclass(frozen=True)
class Choice:
    """The latent the query parameters name, checked against the set on disk."""

    folder: Path
    layer: int
    latent: int
    cfg: dict
    """The layer's cfg.json."""
    n_contexts: int
    """Held-out contexts to run over."""

    @property
    def name(self) -> str:
        return self.folder.name


def _integer(text: str | None, what: str, valid: str) -> int:
    if text is None or not str(text).strip():
        raise ValueError(f"no {what} chosen: add it to the address ({valid})")
    try:
        return int(text)
    except ValueError as error:
        raise ValueError(f"{what} {text!r} is not a number: use {valid}") from error


def layers_text(layers: list[int]) -> str:
    """``0-29`` for a contiguous run of layers, else ``1, 3, 8``."""
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(str(layer) for layer in layers)


def choose(run: Path, query) -> Choice:
    """The set, layer and latent of ``?transcoders=NAME&layer=L&id=F``; ValueError saying what is wrong."""
    folder = resolve_set(run, query.get("transcoders") or None)
    record = read_set(folder)
    layers = record["layers"]
    layer = _integer(query.get("layer"), "layer", f"layers {layers_text(layers)}")
    if layer not in layers:
        raise ValueError(f"layer {layer} is not in transcoder set {folder.name!r} (layers {layers_text(layers)})")
    cfg = read_sae_cfg(layer_dir(folder, layer))
    if not isinstance(cfg.get("d_sae"), int):
        raise ValueError(f"{layer_dir(folder, layer)} has no readable cfg.json: the set {folder.name!r} is damaged")
    d_sae = cfg["d_sae"]
    latent = _integer(query.get("id"), "latent id", f"0-{d_sae - 1}")
    if not 0 <= latent < d_sae:
        raise ValueError(
            f"latent {latent} out of range: layer {layer}'s transcoder has {d_sae} latents (0-{d_sae - 1})"
        )
    heldout = (record.get("training") or {}).get("heldout_contexts")
    n_contexts = min(MAX_CONTEXTS, int(heldout)) if isinstance(heldout, int) and heldout > 0 else MAX_CONTEXTS
    return Choice(folder, layer, latent, cfg, n_contexts)


@st.cache_resource(max_entries=1, show_spinner="loading the model (once per server)…")
def _model(run: str):
    manifest = read_manifest(activations_dir(Path(run)))
    return load_model(
        manifest.model_spec, "cpu", convert_dir=converted_models_dir(), expect_revision=manifest.model_revision
    )


@st.cache_resource(max_entries=8, show_spinner=False)
def _transcoder(folder: str, layer: int, weights_sha256: str):
    tc = transcoder_from_saelens(*load_layer_files(Path(folder), layer))
    if weights_fingerprint(layer_dir(Path(folder), layer)) != weights_sha256:
        raise ValueError("the transcoder was replaced while it loaded: reload the page")
    return tc


@dataclass(frozen=True)
class LayerRun:
    """A layer's codes over the held-out contexts, with the tokens they came from."""

    codes: LayerCodes
    tokens_CT: torch.Tensor
    seconds: float


@st.cache_resource(max_entries=8, show_spinner=False)
def _layer_run(run: str, folder: str, layer: int, weights_sha256: str, n_contexts: int) -> LayerRun:
    """Run the model over the held-out contexts up to block ``layer`` and keep every latent's codes."""
    manifest = read_manifest(activations_dir(Path(run)))
    tokens_CT = last_context_tokens(activations_dir(Path(run)), manifest, n_contexts)
    if tokens_CT.shape[0] == 0:
        raise ValueError(f"{run} has no cached contexts to look for examples in")
    ordinary_CT = ~special_mask(tokens_CT, manifest.special_token_ids)
    loaded = _model(run)
    tc = _transcoder(folder, layer, weights_sha256)
    started = time.perf_counter()
    with hook_lock():
        codes = layer_codes(loaded.model, tc, tokens_CT, layer, ordinary_CT, BATCH_CONTEXTS)
    return LayerRun(codes, tokens_CT, time.perf_counter() - started)


def feature_href(choice: Choice, latent: int) -> str:
    return f"./feature?id={latent}&layer={choice.layer}&transcoders={quote(choice.name)}"


def _nav_link(choice: Choice, latent: int, text: str) -> str:
    return f'<a href="{html.escape(feature_href(choice, latent))}" target="_self">{html.escape(text)}</a>'


def header_html(choice: Choice) -> str:
    """Set, layer, latent, width, activation and hook names, escaped."""
    meta = choice.cfg.get("meta") or {}
    arch = str(choice.cfg.get("activation_fn", "?"))
    if arch == "topk" and "k" in choice.cfg:
        arch += f" (k={choice.cfg['k']})"
    rows = [
        ("set", choice.name),
        ("layer", str(choice.layer)),
        ("latent", str(choice.latent)),
        ("d_sae", str(choice.cfg["d_sae"])),
        ("activation", arch),
        ("reads", str(meta.get("hook_name", "?"))),
        ("writes", str(meta.get("hook_name_out", "?"))),
    ]
    cells = " · ".join(f"<b>{html.escape(k)}</b> {html.escape(v)}" for k, v in rows)
    nav = []
    if choice.latent > 0:
        nav.append(_nav_link(choice, choice.latent - 1, f"← #{choice.latent - 1}"))
    if choice.latent + 1 < choice.cfg["d_sae"]:
        nav.append(_nav_link(choice, choice.latent + 1, f"#{choice.latent + 1} →"))
    return f'<div class="transcoder-header">{cells}</div><div class="feature-nav">{" · ".join(nav)}</div>'


def token_texts(tokenizer, ids: list[int]) -> tuple[list[str], list[bytes | None] | None]:
    """Each id decoded alone, and its bytes where a token is part of a character alone (else None)."""
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    raw = vocab_bytes(tokenizer, ids) if any(REPLACEMENT in t for t in texts) else None
    return texts, raw


def logit_lens_html(model, tokenizer, W_dec_row_D, top_n: int = 10) -> tuple[str, str]:
    """(promoted, suppressed) tokens of one decoder row through the unembedding, as shaded escaped spans."""
    up_v, up_i, down_v, down_i = logit_effects(
        W_dec_row_D.unsqueeze(0), unembedding(model), final_norm_weight(model), top_n=top_n
    )
    parts = []
    for side, values, ids in (("promoted", up_v[0], up_i[0]), ("suppressed", down_v[0], down_i[0])):
        texts, raw = token_texts(tokenizer, [int(i) for i in ids])
        scale = max((abs(float(v)) for v in values), default=1.0)
        chips = [
            '<span style="margin-right:0.7em">'
            + token_spans(
                [text], [abs(float(v))], scale, titles=[f"{float(v):+.4g}"], raw=None if raw is None else [raw[j]]
            )
            + "</span>"
            for j, (text, v) in enumerate(zip(texts, values, strict=True))
        ]
        spans = "".join(chips)
        parts.append(f'<div class="{side}">{spans}</div>')
    return parts[0], parts[1]


def examples_html(examples: list[LatentExample], max_act: float, tokens_CT, tokenizer, cls: str = "example") -> str:
    """Each example's window of tokens, shaded by the latent's activation (``max_act`` darkest), its peak outlined."""
    rows = []
    for example in examples:
        ids = [int(t) for t in tokens_CT[example.context, example.start : example.start + len(example.acts)]]
        texts, raw = token_texts(tokenizer, ids)
        spans = token_spans(texts, example.acts, max_act, peak=example.peak - example.start, raw=raw)
        value = f'<small style="color:#666">{example.activation:.3f}</small> '
        rows.append(f'<div class="{cls}" data-context="{example.context}">{value}{spans}</div>')
    return "".join(rows)


def layer_index(choice: Choice) -> FeatureIndex | None:
    """The layer's feature index (shared, reopened when replaced), or None when it has none built from its weights."""
    folder = layer_dir(choice.folder, choice.layer)
    if not (folder / FEATURE_INDEX).is_file():
        return None
    try:
        return feature_index(folder)
    except (FeatureIndexError, FileNotFoundError):
        return None


def index_tokens_html(entries: list[dict]) -> str:
    """Output tokens of the index ({"token", "raw", "z"}), shaded by |z| (or |raw| without z-scores), escaped."""
    values = [abs(e["z"] if e["z"] is not None else e["raw"]) for e in entries]
    scale = max(values, default=1.0) or 1.0
    chips = [
        '<span style="margin-right:0.7em">'
        + token_spans(
            [e["token"]],
            [v],
            scale,
            titles=[f"raw {e['raw']:+.4g}" + (f", z {e['z']:.2f}" if e["z"] is not None else "")],
        )
        + "</span>"
        for e, v in zip(entries, values, strict=True)
    ]
    return "".join(chips)


def stats_caption(stats: dict, index: FeatureIndex) -> str:
    """What the statistics were computed over, and the dense mark when the index has one."""
    dense = index.metadata.get("dense") or {}
    text = f"over the {int(index.metadata.get('tokens_indexed', 0)):,} indexed tokens"
    if stats.get("dense"):
        text += f" · dense: fires on more than {dense.get('threshold', 0):.0%} of tokens (graph pages can hide it)"
    return text


def render_indexed(choice: Choice, index: FeatureIndex) -> None:
    """Statistics, standardised output tokens, explanation, top and interval examples from the layer's index."""
    from dashboards.views.feature import examples_html as index_examples_html
    from dashboards.views.feature import interval_html

    latent = choice.latent
    stats = index.summary(latent)
    cols = st.columns(3)
    cols[0].metric("density", format_density(stats["density"]) if stats["n_active"] else "dead")
    cols[1].metric("max activation", f"{stats['max_act']:.4g}")
    cols[2].metric("mean (when active)", f"{stats['mean_act']:.4g}")
    st.caption(stats_caption(stats, index))
    st.subheader("Output tokens (decoder row through the unembedding, standardised per token)")
    effects = index.logit_tokens(latent, "standardized")
    left, right = st.columns(2)
    left.caption("promotes")
    left.html(f'<div class="promoted">{index_tokens_html(effects["promoted"])}</div>')
    right.caption("suppresses")
    right.html(f'<div class="suppressed">{index_tokens_html(effects["suppressed"])}</div>')
    explanation_lines(layer_dir(choice.folder, choice.layer), latent)
    st.subheader("Top examples")
    top = index.top_examples(latent, TOP_N)
    if not top:
        st.info(f"latent {latent} never fires on the indexed tokens")
        return
    st.html(index_examples_html(top, stats["max_act"]))
    st.subheader("Interval examples")
    st.caption("the active tokens cut into equal-count activation ranges, lowest first")
    st.html(
        "".join(interval_html(entry, stats["max_act"]) for entry in index.interval_examples(latent, per_bin=PER_BIN))
    )


def explanation_lines(folder: Path, latent: int) -> None:
    """The latent's explanations with their scores beside the controls (a hint before `saescope explain`)."""
    reader = explanations(folder)
    if reader is None:
        st.caption("no explanation yet: `saescope explain --transcoders` labels latents (e.g. with --graphs all)")
        return
    for explanation in reader.for_feature(latent):
        scores = ", ".join(
            f"{s['scorer']} {s['metric']} {s['value']:.2f}"
            + ("" if s["control_value"] is None else f" (control {s['control_value']:.2f})")
            for s in explanation["scores"]
        )
        st.html(f'<div class="explanation"><b>Explanation</b> ({html.escape(explanation["explainer"])}): '
                f"{html.escape(explanation['text'])} <small>{html.escape(scores)}</small></div>")  # fmt: skip


def render() -> None:
    try:
        settings = app_settings()
        choice = choose(settings.run, st.query_params)
        fingerprint = weights_fingerprint(layer_dir(choice.folder, choice.layer))
        loaded = _model(str(settings.run))
        tc = _transcoder(str(choice.folder), choice.layer, fingerprint)
    except (ValueError, FileNotFoundError, OSError) as error:
        st.title("Transcoder feature")
        show_error(error)
        return
    st.title(f"Transcoder feature {choice.latent} · layer {choice.layer}")
    st.html(header_html(choice))
    index = layer_index(choice)
    if index is not None:
        render_indexed(choice, index)
        st.subheader("Steer with this latent")
        steer_panel(
            loaded, tc, choice.layer, choice.latent, index.typical_activations([choice.latent])[choice.latent][0]
        )
        return
    st.caption(
        f"no feature index for this layer: examples are computed live; build one with "
        f"`saescope index --run {settings.run} --transcoders {choice.name}`"
    )
    st.subheader("Output tokens (logit lens of the decoder row)")
    promoted, suppressed = logit_lens_html(loaded.model, loaded.tokenizer, tc.W_dec[choice.latent].detach())
    left, right = st.columns(2)
    left.caption("promotes")
    left.html(promoted)
    right.caption("suppresses")
    right.html(suppressed)
    try:
        with st.spinner(f"running the model over {choice.n_contexts} held-out contexts up to block {choice.layer}…"):
            layer_run = _layer_run(str(settings.run), str(choice.folder), choice.layer, fingerprint, choice.n_contexts)
    except (ValueError, FileNotFoundError, OSError) as error:
        show_error(error)
        return
    stats = latent_examples(layer_run.codes, choice.latent, TOP_N, WINDOW)
    cols = st.columns(3)
    density = format_density(stats.density) if stats.n_active else "0"  # not "dead": a sample of held-out text
    cols[0].metric("density", density, help=f"{stats.n_active:,} of {stats.n_tokens:,} held-out tokens")
    cols[1].metric("max activation", f"{stats.max_act:.4g}")
    cols[2].metric("mean (when active)", f"{stats.mean_act:.4g}")
    st.subheader("Top examples")
    n_ctx = int(layer_run.tokens_CT.shape[0])
    st.caption(
        f"the {TOP_N} held-out contexts (of the cache's last {n_ctx}) with the highest activation, "
        f"computed live in {layer_run.seconds:.2f} s and kept for this layer"
    )
    if not stats.examples:
        st.info(f"latent {choice.latent} does not fire on these {stats.n_tokens:,} tokens")
        return
    st.html(examples_html(stats.examples, stats.max_act, layer_run.tokens_CT, loaded.tokenizer))
    bins = interval_examples(layer_run.codes, choice.latent, N_BINS, PER_BIN, WINDOW // 2)
    st.subheader("Interval examples")
    st.caption(f"the active tokens cut into {len(bins)} equal-count activation ranges, lowest first")
    for entry in bins:
        st.html(
            f'<div class="interval"><small>({entry.low:.3g}, {entry.high:.3g}] · {entry.n_tokens:,} tokens</small>'
            f"{examples_html(entry.examples, stats.max_act, layer_run.tokens_CT, loaded.tokenizer, 'interval-example')}"
            "</div>"
        )
    st.subheader("Steer with this latent")
    steer_panel(loaded, tc, choice.layer, choice.latent, stats.max_act)
