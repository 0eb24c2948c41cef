"""Held-out evaluation of an SAE: reconstruction metrics from the cache, LM loss through the model.

Used by `saescope train` (final metrics) and `saescope eval`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs.run import cache_hook_point, load_run_model
from pipeline.evaluation.lm_loss import splice_metrics
from pipeline.evaluation.reconstruction import reconstruction_report
from pipeline.lm.models import LoadedModel
from pipeline.lm.packing import special_mask
from pipeline.sae.model import Sae
from storage.shards import CacheManifest, activations_dir
from storage.training_data import heldout_range, iter_heldout


@dataclass(frozen=True)
class EvalSettings:
    heldout_contexts: int
    """Contexts at the end of the cache used for evaluation."""
    lm_contexts: int
    """How many of them also go through the model for CE-loss recovered (0: skip)."""
    batch_size: int = 4096


def heldout_batches(run_dir: Path, manifest: CacheManifest, settings: EvalSettings) -> Iterator[torch.Tensor]:
    """Held-out activations of ordinary (non-special) positions, in batches [N, D]."""
    for acts_CTD, tokens_CT in iter_heldout(activations_dir(run_dir), manifest, settings.heldout_contexts):
        x_ND = acts_CTD[~special_mask(tokens_CT, manifest.special_token_ids)]
        yield from x_ND.split(settings.batch_size)


def lm_metrics(sae: Sae, run_dir: Path, manifest: CacheManifest, settings: EvalSettings, loaded: LoadedModel) -> dict:
    """CE-loss recovered, delta LM loss and KL on the first ``lm_contexts`` held-out contexts, at the cache's hook."""
    first, _ = heldout_range(manifest, settings.heldout_contexts)
    tokens = [t for _, t in iter_heldout(activations_dir(run_dir), manifest, settings.heldout_contexts)]
    tokens_CT = torch.cat(tokens)[: settings.lm_contexts]
    ordinary_CT = ~special_mask(tokens_CT, manifest.special_token_ids)
    point = cache_hook_point(manifest)
    device = next(loaded.model.parameters()).device
    sae = sae.to(device)
    result = splice_metrics(loaded.model, point, lambda h: sae.reconstruct(h.float()), tokens_CT, ordinary_CT)
    out = result.as_dict()
    out["n_tokens_lm"] = out.pop("n_tokens")
    return {**out, "lm_eval_first_context": first, "lm_eval_contexts": int(tokens_CT.shape[0])}


def evaluate(sae: Sae, run_dir: Path, manifest: CacheManifest, settings: EvalSettings, device: torch.device) -> dict:
    """All held-out metrics of an exported (raw-unit) SAE."""
    metrics = {"heldout_contexts": settings.heldout_contexts}
    metrics.update(reconstruction_report(sae, heldout_batches(run_dir, manifest, settings)))
    if settings.lm_contexts > 0:
        metrics.update(lm_metrics(sae, run_dir, manifest, settings, load_run_model(manifest, device)))
    return metrics
