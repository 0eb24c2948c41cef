"""What every feature index holds beside its codes, written the same way for an SAE and for each transcoder layer.

``finish_index`` takes a builder that has seen every code and context, the statistics
accumulated over them and the dictionary's decoder, and writes the per-feature
statistics, top examples, output-token rankings (raw and standardised per token through
the unembedding), decoder neighbours, the vocabulary and the metadata, then finishes the
index (interval examples included) and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.features.decoder_geometry import logit_effect_rankings, nearest_by_decoder
from pipeline.features.statistics import FeatureAccumulator
from storage.index_builder import IndexBuilder
from storage.shards import CacheManifest


def vocab_strings(tokenizer, vocab_size: int) -> list[str]:
    """Every token id's text, as the index stores it."""
    return tokenizer.batch_decode([[i] for i in range(vocab_size)], clean_up_tokenization_spaces=False)


def finish_index(
    builder: IndexBuilder,
    acc: FeatureAccumulator,
    W_dec: torch.Tensor,
    W_U: torch.Tensor,
    gamma: torch.Tensor | None,
    vocab: list[str],
    metadata: dict,
    manifest: CacheManifest,
    cfg,
    dense_threshold: float | None = None,
) -> Path:
    """Write everything but the codes (module docstring) and finish; ``cfg`` carries the index options."""
    W_dec = W_dec.detach()
    builder.write_features(acc.count_F, acc.density_F(), acc.max_F, acc.mean_F(), dense_threshold=dense_threshold)
    builder.write_top_examples(acc.top_value_FK, acc.top_context_FK, acc.top_position_FK)
    gamma = None if gamma is None else gamma.to(W_dec.device)
    raw, standardized = logit_effect_rankings(W_dec, W_U.to(W_dec.device), gamma)
    builder.write_logit_effects(*raw)
    builder.write_standardized_effects(standardized)
    builder.write_neighbours(*nearest_by_decoder(W_dec))
    builder.write_vocab(vocab)
    builder.write_metadata(metadata)
    return builder.finish(manifest.ctx_len, cfg.window, cfg.width_bins, cfg.quantile_bins, cfg.samples_per_bin)
