"""`saescope index`: one streaming pass of an SAE over the cache into a DuckDB feature index.

Memory grows with features x top-k, not with tokens: statistics and top examples
accumulate in fixed-size tensors, and every non-zero activation is spilled to a
scratch DuckDB file that sorts out of core. The finished index replaces the old
one atomically. With ``--transcoders SET`` the verb indexes a transcoder set instead,
one index per layer from one pass (``jobs.index_transcoders``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs import index_transcoders
from jobs.console import human_bytes, human_count, progress
from jobs.index_writing import finish_index, vocab_strings
from jobs.options import add_config_arguments, auto_or, config_from_args, option, require
from jobs.run import Run, check_fits_cache, open_run
from pipeline.features.decoder_geometry import (
    final_norm_weight,
    unembedding,
)
from pipeline.features.statistics import CodeBatch, FeatureAccumulator
from pipeline.lm.packing import special_mask
from pipeline.runtime.precision import resolve_device
from pipeline.sae.model import Sae
from storage.constants import INDEX_LOCK
from storage.index_builder import IndexBuilder
from storage.locks import exclusive
from storage.sae_store import SaeRecord, weights_fingerprint
from storage.shards import CacheManifest, activations_dir, iter_shards

DENSE_THRESHOLD = 0.1
"""Default --dense-threshold (see README: why 10% and not 1%)."""
MEMORY_LIMIT = re.compile(r"\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)", re.IGNORECASE)


@dataclass(frozen=True)
class IndexConfig:
    """Options of `saescope index`."""

    run: str = option(help="run directory")
    sae: str | None = option(None, "SAE name (default: the run's only SAE)")
    transcoders: str | None = option(
        None, "index this transcoder set instead of an SAE: one index per layer, in one pass (see index_transcoders)"
    )
    layers: str = option("all", "with --transcoders: the layers to index: all, 5, 0-29 or 1,3,8-10")
    dense_threshold: float = option(
        DENSE_THRESHOLD, "with --transcoders: mark latents firing on more than this share of tokens as dense"
    )
    tokens: int | None = option(None, "index only the first N cached tokens (default: all)", parse=auto_or(int))
    top_k: int = option(20, "top examples kept per feature")
    window: int = option(16, "tokens shown on each side of an example's token")
    width_bins: int = option(8, "equal-width activation bins per feature")
    quantile_bins: int = option(8, "equal-count activation bins per feature")
    samples_per_bin: int = option(8, "random examples kept per bin (explanations draw on them)")
    batch_contexts: int = option(32, "contexts encoded per batch")
    memory_limit: str = option("1GB", "DuckDB memory limit while building (it spills to disk beyond it)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")

    def __post_init__(self):
        require(self.top_k >= 1, "--top-k must be at least 1")
        require(self.window >= 0, "--window must be >= 0")
        require(self.width_bins >= 1 and self.quantile_bins >= 1, "bin counts must be at least 1")
        require(self.samples_per_bin >= 1, "--samples-per-bin must be at least 1")
        require(self.batch_contexts >= 1, "--batch-contexts must be at least 1")
        require(self.tokens is None or self.tokens > 0, "--tokens must be positive")
        require(0 < self.dense_threshold <= 1, f"--dense-threshold must be in (0, 1], got {self.dense_threshold}")
        require(self.sae is None or self.transcoders is None, "--sae and --transcoders exclude each other: pick one")
        require(self.layers == "all" or self.transcoders is not None, "--layers needs --transcoders (an SAE has one)")
        require(
            MEMORY_LIMIT.fullmatch(self.memory_limit.strip()) is not None,
            f"--memory-limit {self.memory_limit!r} is not a size: use e.g. 512MB, 1GB or 2.5GiB",
        )


@dataclass(frozen=True)
class IndexSummary:
    path: Path
    n_tokens: int
    n_features: int
    n_dead: int
    seconds: float
    encode_seconds: float


def _encode_batches(sae: Sae, manifest: CacheManifest, folder: Path, cfg: IndexConfig, device):
    """Yield (context ids [C], tokens [C, T], CodeBatch, indexed token count) per batch of contexts."""
    limit = manifest.n_contexts if cfg.tokens is None else -(-cfg.tokens // manifest.ctx_len)
    seen = 0
    for shard in iter_shards(folder, manifest):
        for start in range(0, shard.record.n_ctx, cfg.batch_contexts):
            if seen >= limit:
                return
            stop = min(start + cfg.batch_contexts, shard.record.n_ctx, start + limit - seen)
            tokens_CT = shard.tokens_CT[start:stop].long()
            context_C = torch.arange(stop - start) + shard.record.first_context + start
            ordinary_CT = ~special_mask(tokens_CT, manifest.special_token_ids)
            x_ND = shard.activations_CTD[start:stop][ordinary_CT].to(device, torch.float32)
            acts_NK, idx_NK = sae.encode_sparse(x_ND)
            where = ordinary_CT.nonzero()
            codes = CodeBatch.from_codes(acts_NK.cpu(), idx_NK.cpu(), context_C[where[:, 0]], where[:, 1])
            seen += stop - start
            yield context_C, tokens_CT, codes, int(ordinary_CT.sum())


def _metadata(
    manifest: CacheManifest,
    sae: Sae,
    sae_cfg: dict,
    sae_name: str,
    fingerprint: str,
    cfg: IndexConfig,
    acc: FeatureAccumulator,
) -> dict:
    record = SaeRecord(sae_cfg)
    return {
        "model": manifest.provenance["model"],
        "hook": manifest.provenance["hook"],
        "corpus": manifest.provenance["corpus"]["description"],
        "sae": {
            "name": sae_name,
            "architecture": sae.cfg.architecture,
            "d_in": sae.cfg.d_in,
            "d_sae": sae.cfg.d_sae,
            "k": sae.cfg.k if sae.cfg.architecture == "topk" else None,
            "trained_architecture": record.trained_architecture,
            "weights_sha256": fingerprint,
        },
        "metrics": record.metrics,
        "tokens_indexed": acc.n_tokens,
        "top_k": cfg.top_k,
    }


def run_index(cfg: IndexConfig) -> IndexSummary:
    """Build ``features.duckdb`` for the run's SAE; see the module docstring."""
    started = time.perf_counter()
    run = open_run(cfg.run, cfg.sae)
    device = resolve_device(cfg.device)
    with exclusive(run.sae_folder / INDEX_LOCK, f"the feature index of {run.sae_folder}"):
        return _index_locked(cfg, run, device, started)


def _index_locked(cfg, run: Run, device, started) -> IndexSummary:
    run_dir, manifest, sae_folder = run.folder, run.manifest, run.sae_folder
    folder = activations_dir(run_dir)
    fingerprint = weights_fingerprint(sae_folder)
    sae, sae_cfg = run.sae()
    check_fits_cache(sae_cfg, manifest, sae_folder)
    sae = sae.to(device).eval()
    loaded = run.model(device)
    acc = FeatureAccumulator(sae.cfg.d_sae, cfg.top_k)
    total = manifest.n_tokens if cfg.tokens is None else min(cfg.tokens, manifest.n_tokens)
    encode_seconds = 0.0
    with IndexBuilder(sae_folder, memory_limit=cfg.memory_limit, threads=torch.get_num_threads()) as builder:
        with progress(total, "index") as bar:
            tick = time.perf_counter()
            for context_C, tokens_CT, codes, n_indexed in _encode_batches(sae, manifest, folder, cfg, device):
                encode_seconds += time.perf_counter() - tick
                acc.update(codes, n_indexed)
                builder.add_codes(codes.feature, codes.context, codes.position, codes.value)
                builder.add_contexts(context_C, tokens_CT)
                bar.update(tokens_CT.numel())
                tick = time.perf_counter()
        path = finish_index(
            builder, acc, sae.W_dec, unembedding(loaded.model), final_norm_weight(loaded.model),
            vocab_strings(loaded.tokenizer, loaded.info.vocab_size),
            _metadata(manifest, sae, sae_cfg, sae_folder.name, fingerprint, cfg, acc), manifest, cfg,
        )  # fmt: skip
    n_dead = int((acc.count_F == 0).sum())
    return IndexSummary(path, acc.n_tokens, sae.cfg.d_sae, n_dead, time.perf_counter() - started, encode_seconds)


def format_summary(summary: IndexSummary, run: str) -> str:
    size = human_bytes(summary.path.stat().st_size)
    rate = summary.n_tokens / max(summary.seconds, 1e-9)
    return "\n".join(
        [
            f"indexed {human_count(summary.n_tokens)} tokens x {summary.n_features} features in {summary.seconds:.0f}s "
            f"({rate:,.0f} tokens/s; encoding alone {summary.encode_seconds:.0f}s)",
            f"  {summary.n_features - summary.n_dead} live, {summary.n_dead} dead features",
            f"  index {summary.path} ({size})",
            f"next: saescope features --run {run}   |   saescope show --run {run} --feature N",
        ]
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser("index", help="index every feature's statistics and examples in DuckDB")
    add_config_arguments(parser, IndexConfig)
    parser.set_defaults(handler=command)


def command(args) -> int:
    cfg = config_from_args(IndexConfig, args)
    if cfg.transcoders is not None:
        print(index_transcoders.format_summary(index_transcoders.run_transcoder_index(cfg), cfg.run))
        return 0
    print(format_summary(run_index(cfg), cfg.run))
    return 0
