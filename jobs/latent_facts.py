"""What a transcoder set's feature indexes and explanations say about some latents: the facts graph labels use.

Per layer, the layer's index (``saescope index --transcoders``) gives each latent's
density and dense mark, the tokens its top examples peak on, and its standardised
promoted tokens; its explanations (``saescope explain --transcoders``), when any,
give the phrase for what it reads. Layers without a current index are left out
(labels then fall back to live contexts and the decoder).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.explain.token_explainer import NO_PATTERN
from pipeline.tracing.feature_labels import LatentFacts, quoted_tokens
from storage.explanations import open_explanations
from storage.index_queries import FeatureIndexError, open_transcoder_index
from storage.sae_store import SaeStoreError, weights_fingerprint
from storage.transcoder_store import layer_dir

SHOWN = 3
"""Tokens shown on each side of a label."""


def explanation_phrase(row: dict, shown: int = SHOWN) -> str | None:
    """What a stored explanation says a latent reads, shortened to ``shown`` tokens (None: it found nothing)."""
    if row.get("explainer") != "tokens":
        return str(row["text"]) if row.get("text") else None
    if row.get("text") == NO_PATTERN or not row.get("tokens"):
        return None
    more = ", ..." if len(row["tokens"]) > shown else ""
    verb = "fires after " if row.get("token_kind") == "previous" else "fires on "
    return verb + quoted_tokens(list(row["tokens"][:shown])) + more


def layer_facts(set_folder: Path, layer: int, latents: list[int], shown: int = SHOWN) -> dict[int, LatentFacts]:
    """latent -> facts from one layer's index and explanations ({} when the layer has no current index)."""
    try:
        index = open_transcoder_index(set_folder, layer)
    except (FeatureIndexError, SaeStoreError):
        return {}
    with index:
        densities = index.densities(latents)
        peaks = index.peak_tokens(latents, shown)
        promoted = index.promoted_tokens(latents, shown)
    folder = layer_dir(set_folder, layer)
    reader = open_explanations(folder, weights_fingerprint(folder))
    explained = {}
    if reader is not None:
        with reader:
            explained = reader.labels(latents)
    facts = {}
    for latent in latents:
        row = explained.get(latent)
        density, dense = densities[latent]
        facts[latent] = LatentFacts(
            reads=explanation_phrase(row, shown) if row else None,
            peak_ids=tuple(peaks[latent]),
            promoted_ids=tuple(promoted[latent]),
            density=density,
            dense=dense,
        )
    return facts


def set_latent_facts(set_folder: Path, wanted: dict[int, list[int]]) -> dict[tuple[int, int], LatentFacts]:
    """(layer, latent) -> facts, for the latents of ``wanted`` (layer -> latents) whose layer is indexed."""
    return {
        (layer, latent): facts
        for layer, latents in wanted.items()
        for latent, facts in layer_facts(Path(set_folder), layer, latents).items()
    }
