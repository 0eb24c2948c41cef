"""Graph feature labels that say what each latent reads and what it writes: ``fires on "a", "b" → promotes "c", "d"``.

Shape legend: C contexts, T positions, B contexts in a batch, N ordinary tokens, L latents of one layer.

A label is two-sided. What a latent writes is the tokens its decoder row promotes most
through the unembedding, standardised per token over its layer's latents (a token every
direction pushes, a "junk" token, tops no list; ``standardized_promoted``), or the same
ranking read from the layer's feature index. What it reads comes, in order of preference,
from what ``LatentFacts`` bring (an explanation, else the tokens its indexed top examples
peak on), else from the tokens it fires hardest on over some token contexts
(``top_input_tokens``: the model runs once per batch of contexts, stopping after the
deepest layer asked for, and keeps for each asked latent the first ``top_n`` distinct
tokens in order of activation, ties broken by position), else from the prompt itself
(the tokens at the positions where it is a node). Raw logit-lens tokens are never used.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.explain.token_explainer import NO_PATTERN
from pipeline.features.decoder_geometry import final_norm_weight, standardized_promoted, unembedding
from pipeline.lm.hook_points import HookPoint, capture
from pipeline.lm.token_text import token_text
from pipeline.sae.transcoder import Transcoder
from pipeline.tracing.attribution import Graph
from pipeline.tracing.graph_json import display_token


@torch.inference_mode()
def top_input_tokens(
    model: nn.Module,
    transcoders: dict[int, Transcoder],
    wanted: dict[int, list[int]],
    tokens_CT: torch.Tensor,
    ordinary_CT: torch.Tensor,
    top_n: int = 3,
    batch_contexts: int = 8,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[tuple[int, int], list[int]]:
    """(layer, latent) -> up to ``top_n`` distinct token ids where it fires hardest ([] if it never fires).

    ``on_batch(contexts done, contexts in all)``, if given, is called after each batch of contexts.
    """
    layers = sorted(layer for layer, latents in wanted.items() if latents)
    if not layers or tokens_CT.shape[0] == 0:
        return {(layer, latent): [] for layer, latents in wanted.items() for latent in latents}
    device = next(model.parameters()).device
    points = {layer: HookPoint(layer, "mlp-in") for layer in layers}
    acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    token_ids: list[torch.Tensor] = []
    for start in range(0, tokens_CT.shape[0], batch_contexts):
        ids_BT = tokens_CT[start : start + batch_contexts].to(device=device, dtype=torch.long)
        ordinary_BT = ordinary_CT[start : start + batch_contexts].to(device)
        captured = capture(model, ids_BT, points.values())
        token_ids.append(ids_BT[ordinary_BT].cpu())
        for layer in layers:
            x_ND = captured[points[layer]][ordinary_BT].float()
            latents = torch.tensor(wanted[layer], device=device)
            acts[layer].append(transcoders[layer].encode(x_ND)[:, latents].cpu())
        if on_batch is not None:
            on_batch(min(start + batch_contexts, tokens_CT.shape[0]), tokens_CT.shape[0])
    tokens_N = torch.cat(token_ids)
    return {
        (layer, latent): _distinct_top(column, tokens_N, top_n)
        for layer in layers
        for latent, column in zip(wanted[layer], torch.cat(acts[layer]).T, strict=True)
    }


def _distinct_top(acts_N: torch.Tensor, tokens_N: torch.Tensor, top_n: int) -> list[int]:
    chosen: list[int] = []
    for position in torch.argsort(-acts_N, stable=True).tolist():
        if acts_N[position] <= 0 or len(chosen) == top_n:
            break
        token = int(tokens_N[position])
        if token not in chosen:
            chosen.append(token)
    return chosen


def graph_latents(graph: Graph) -> dict[int, list[int]]:
    """layer -> the sorted latents of the graph's feature nodes there."""
    wanted: dict[int, set[int]] = {}
    for layer, _, latent in graph.features.tolist():
        wanted.setdefault(int(layer), set()).add(int(latent))
    return {layer: sorted(latents) for layer, latents in sorted(wanted.items())}


@dataclass(frozen=True)
class LatentFacts:
    """What storage knows about one latent (its layer's feature index and explanations), for its label."""

    reads: str | None = None
    """An explanation of what it fires on, already phrased (e.g. 'fires on "a", "b"'), or None."""
    peak_ids: tuple[int, ...] = ()
    """Token ids its top examples peak on most often (used when ``reads`` is None)."""
    promoted_ids: tuple[int, ...] = ()
    """Token ids it promotes most, standardised ranking (empty: compute from the decoder)."""
    density: float | None = None
    """Share of indexed tokens it fires on (None: no index)."""
    dense: bool | None = None
    """The index's dense mark (None: no index)."""
    example: str | None = None
    """Its strongest indexed example as plain text, a few tokens either side of the peak (None: no index)."""

    @property
    def knows_reads(self) -> bool:
        return self.reads is not None or bool(self.peak_ids)


def explanation_phrase(row: dict, shown: int = 3) -> str | None:
    """What a stored explanation says a latent reads, shortened to ``shown`` tokens (None: it found nothing)."""
    if row.get("explainer") != "tokens":
        return str(row["text"]) if row.get("text") else None
    if row.get("text") == NO_PATTERN or not row.get("tokens"):
        return None
    more = ", ..." if len(row["tokens"]) > shown else ""
    if row.get("token_kind") == "bigram":  # 'fires on "b" after "a"; "d" after "c"': keep whole pairs
        pairs = str(row["text"]).removeprefix("fires on ").removesuffix(", ...").split("; ")
        return "fires on " + "; ".join(pairs[:shown]) + more
    verb = "fires after " if row.get("token_kind") == "previous" else "fires on "
    return verb + quoted_tokens(list(row["tokens"][:shown])) + more


EXAMPLE_RADIUS = 8
"""Tokens either side of the peak in a node's example text."""


def example_text(tokens: list[str], peak: int, radius: int = EXAMPLE_RADIUS) -> str:
    """The window's tokens ``radius`` either side of ``peak``, joined as plain text."""
    return "".join(tokens[max(0, peak - radius) : peak + radius + 1])


def facts_from_index(rows: dict[tuple[int, int], dict], shown: int = 3) -> dict[tuple[int, int], LatentFacts]:
    """``LatentFacts`` from the rows ``storage.latent_facts.indexed_latents`` reads."""
    return {
        key: LatentFacts(
            reads=explanation_phrase(row["explanation"], shown) if row.get("explanation") else None,
            peak_ids=tuple(row["peak_ids"][:shown]),
            promoted_ids=tuple(row["promoted_ids"][:shown]),
            density=row["density"],
            dense=row["dense"],
            example=example_text(*row["example"]) if row.get("example") else None,
        )
        for key, row in rows.items()
    }


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def label_items(label: str) -> tuple[list[str], list[str]]:
    """(what it reads, what it writes): the quoted tokens of each side of a two-sided label, or, for a side
    without quotes (an LLM's phrase, an older label ``a · b → c``), its `` · ``-separated items."""
    reads, _, writes = label.partition("→")
    return tuple(_QUOTED.findall(side) or side.split("·") for side in (reads, writes))


def quoted_tokens(texts: list[str]) -> str:
    """'"a", "b"' with newlines and tabs made visible, as the viewer shows tokens."""
    return ", ".join('"' + display_token(text) + '"' for text in texts)


def two_sided_label(reads: str, promoted: list[str]) -> str:
    """``reads → promotes "x", "y"`` (``reads`` is a phrase such as 'fires on "a"')."""
    writes = "promotes " + quoted_tokens(promoted) if promoted else "promotes no token clearly"
    return f"{reads} → {writes}"


def _reads(facts: LatentFacts | None, fired: list[int], at_prompt: list[int], tokenizer) -> str:
    if facts is not None and facts.reads is not None:
        return facts.reads
    ids = list(facts.peak_ids) if facts is not None and facts.peak_ids else fired
    if ids:
        return "fires on " + quoted_tokens([token_text(tokenizer, t) for t in ids])
    return "fires here on " + quoted_tokens([token_text(tokenizer, t) for t in at_prompt])


def prompt_tokens(graph: Graph, top_n: int = 3) -> dict[tuple[int, int], list[int]]:
    """(layer, latent) -> the distinct prompt tokens at its node positions, strongest activation first."""
    order = torch.argsort(-graph.activations.float(), stable=True).tolist() if graph.activations.numel() else []
    found: dict[tuple[int, int], list[int]] = {}
    prompt = graph.prompt_ids.tolist()
    features = graph.features.tolist()
    for i in order:
        layer, pos, latent = features[i]
        ids = found.setdefault((int(layer), int(latent)), [])
        if len(ids) < top_n and prompt[pos] not in ids:
            ids.append(int(prompt[pos]))
    return found


def feature_labels(
    model: nn.Module,
    transcoders: dict,
    graph: Graph,
    tokenizer,
    inputs: dict | None = None,
    top_n: int = 3,
    facts: dict[tuple[int, int], LatentFacts] | None = None,
) -> dict[tuple[int, int], str]:
    """(layer, latent) -> its two-sided label (see the module docstring).

    ``inputs``: (layer, latent) -> token ids it fires on over some contexts (``top_input_tokens``);
    ``facts``: what the layer's index and explanations say, preferred where present.
    """
    inputs, facts = inputs or {}, facts or {}
    at_prompt = prompt_tokens(graph, top_n)
    W_U, gamma = unembedding(model).float(), final_norm_weight(model)
    labels = {}
    for layer, latents in graph_latents(graph).items():
        missing = [latent for latent in latents if not (facts.get((layer, latent)) or LatentFacts()).promoted_ids]
        computed = {}
        if missing:
            W_dec = transcoders[layer].W_dec.detach().float()
            ids = standardized_promoted(W_dec, missing, W_U.to(W_dec.device), gamma, top_n)
            computed = dict(zip(missing, ids.tolist(), strict=True))
        for latent in latents:
            known = facts.get((layer, latent))
            promoted = list(known.promoted_ids[:top_n]) if known and known.promoted_ids else computed[latent]
            reads = _reads(known, inputs.get((layer, latent), []), at_prompt.get((layer, latent), []), tokenizer)
            labels[(layer, latent)] = two_sided_label(reads, [token_text(tokenizer, t) for t in promoted])
    return labels
