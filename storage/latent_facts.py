"""What a transcoder set's feature indexes and explanations hold about some latents, for graph labels.

Per layer with a current index (``saescope index --transcoders``): each latent's density
and dense mark, the tokens its top examples peak on, its standardised promoted tokens, its
strongest example, and
its best explanation row when ``saescope explain --transcoders`` has run. Layers without a
current index are left out; ``pipeline.tracing.feature_labels.facts_from_index`` turns the
rows into label facts.
"""

from __future__ import annotations

from pathlib import Path

from storage.explanations import open_explanations
from storage.index_queries import FeatureIndexError, open_transcoder_index
from storage.sae_store import SaeStoreError, weights_fingerprint
from storage.transcoder_store import layer_dir


def layer_rows(set_folder: Path, layer: int, latents: list[int], top_n: int = 3) -> dict[int, dict]:
    """latent -> {density, dense, peak_ids, promoted_ids, explanation, example} ({} without a current index).

    ``example`` is the strongest top example as (decoded tokens of its window, index of its peak), or None.
    """
    try:
        index = open_transcoder_index(set_folder, layer)
    except (FeatureIndexError, SaeStoreError):
        return {}
    with index:
        densities = index.densities(latents)
        peaks = index.peak_tokens(latents, top_n)
        promoted = index.promoted_tokens(latents, top_n)
        snippets = index.top_snippets(latents)
    folder = layer_dir(set_folder, layer)
    reader = open_explanations(folder, weights_fingerprint(folder))
    explained = {}
    if reader is not None:
        with reader:
            explained = reader.labels(latents)
    return {
        latent: {
            "density": densities[latent][0],
            "dense": densities[latent][1],
            "peak_ids": peaks[latent],
            "promoted_ids": promoted[latent],
            "explanation": explained.get(latent),
            "example": (snippets[latent].tokens, snippets[latent].peak) if latent in snippets else None,
        }
        for latent in latents
    }


def indexed_latents(set_folder: Path, wanted: dict[int, list[int]], top_n: int = 3) -> dict[tuple[int, int], dict]:
    """(layer, latent) -> ``layer_rows``' row, for the latents of ``wanted`` (layer -> latents) in indexed layers."""
    return {
        (layer, latent): row
        for layer, latents in wanted.items()
        for latent, row in layer_rows(Path(set_folder), layer, latents, top_n).items()
    }
