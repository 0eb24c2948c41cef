"""`saescope index --transcoders SET`: one streaming pass over the cache into a feature index per transcoder layer.

Each layer's index is the SAE index format (storage/index_builder.py) in that layer's
folder, ``transcoders/SET/layer-LL/features.duckdb``, so every index query, `explain`
and the pages read a latent as (layer folder, latent). One pass over the cache's
contexts feeds every layer: the MLP inputs come from the cache when it holds ``mlp-in``
at every layer being indexed, else from one forward of the model per batch (in the
dtype the cache was made with, as transcoder training reads it), stopping after the
deepest layer. Output tokens are the decoder rows through the unembedding, ranked raw
and standardised per token over the layer's latents (``logit_effect_rankings``).

Dense latents: ``features.dense`` marks latents whose density exceeds ``--dense-threshold``
(recorded in the metadata's ``dense`` entry); graphs carry the mark so pages can hide them.

Atomic and resumable by layer: every layer's index is built in a temp file and renamed
into place when complete (a killed job leaves the old index, or none, never a half one);
a layer whose index was built from the same weights with the same settings is skipped,
so a re-run after a kill indexes only the layers still missing.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs.console import human_count, progress
from jobs.index_writing import finish_index, vocab_strings
from jobs.options import ConfigError
from jobs.run import load_run_model
from pipeline.features.decoder_geometry import (
    final_norm_weight,
    unembedding,
)
from pipeline.features.statistics import CodeBatch, FeatureAccumulator
from pipeline.features.transcoder_codes import encode_layers, live_mlp_inputs
from pipeline.lm.hook_points import HookPoint, parse_layers
from pipeline.lm.packing import special_mask
from pipeline.runtime.precision import resolve_device
from pipeline.sae.transcoder_format import transcoder_from_saelens
from storage.constants import FEATURE_INDEX, INDEX_LOCK
from storage.index_builder import IndexBuilder
from storage.index_queries import FeatureIndex, FeatureIndexError
from storage.locks import exclusive
from storage.sae_store import SaeRecord, weights_fingerprint
from storage.shards import CacheError, CacheManifest, activations_dir, load_shard, load_tokens, read_manifest
from storage.transcoder_store import layer_dir, load_layer_files, read_set, resolve_set

STREAM_MEMORY_FLOOR = 64 * 2**20
"""Each layer's builder may use at least this much while the pass streams (all are open at once)."""
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


@dataclass(frozen=True)
class LayerSummary:
    layer: int
    path: Path
    n_dead: int
    n_dense: int
    skipped: bool
    """Its index was already current (same weights, same settings)."""


@dataclass(frozen=True)
class TranscoderIndexSummary:
    set_name: str
    source: str
    """"cache" (cached mlp-in) or "model" (a live forward)."""
    n_tokens: int
    n_latents: int
    dense_threshold: float
    layers: list[LayerSummary]
    seconds: float
    encode_seconds: float


def memory_bytes(text: str) -> int:
    """Bytes of a DuckDB size such as ``1GB`` or ``512MiB`` (checked by IndexConfig)."""
    number = text.strip().upper().rstrip("BKMGTI ")
    unit = text.strip().upper()[len(number) :].strip()
    return int(float(number) * UNITS[unit])


def chosen_layers(text: str, set_layers: list[int], set_name: str) -> list[int]:
    """The set's layers that ``--layers`` names (all, 5, 0-29, 1,3,8-10)."""
    top = max(set_layers) + 1
    try:
        wanted = parse_layers(text, top)
    except ValueError as error:
        raise ConfigError(f"--layers: {error}") from error
    missing = [layer for layer in wanted if layer not in set_layers]
    if missing:
        raise ConfigError(f"--layers: transcoder set {set_name!r} has no layer {missing[0]} (it has {set_layers})")
    return [layer for layer in set_layers if layer in wanted]


def input_source(manifest: CacheManifest, layers: list[int]) -> str:
    """Where the MLP inputs come from: "cache" when it holds mlp-in at every layer, else "model"."""
    try:
        for layer in layers:
            manifest.select(layer, "mlp-in")
    except CacheError:
        return "model"
    return "cache"


def build_settings(cfg, manifest: CacheManifest, n_contexts: int, source: str) -> dict:
    """What identifies a layer's index besides its weights (a re-run with equal settings skips the layer)."""
    return {
        "contexts": n_contexts,
        "ctx_len": manifest.ctx_len,
        "top_k": cfg.top_k,
        "window": cfg.window,
        "width_bins": cfg.width_bins,
        "quantile_bins": cfg.quantile_bins,
        "samples_per_bin": cfg.samples_per_bin,
        "dense_threshold": cfg.dense_threshold,
        "source": source,
    }


def is_current(folder: Path, fingerprint: str, settings: dict) -> bool:
    """The layer folder's index exists, was built from these weights, with these settings."""
    if not (folder / FEATURE_INDEX).is_file():
        return False
    try:
        with FeatureIndex.for_sae(folder, fingerprint) as index:
            return index.metadata.get("transcoder_index") == settings
    except FeatureIndexError:
        return False


def _context_limit(cfg, manifest: CacheManifest) -> int:
    return manifest.n_contexts if cfg.tokens is None else min(manifest.n_contexts, -(-cfg.tokens // manifest.ctx_len))


def _batches(cfg, manifest: CacheManifest, layers: list[int], source: str, model):
    """Yield (context ids [B], tokens [B, T], ordinary mask [B, T], layer -> MLP inputs [N, D]) per batch."""
    folder, limit, seen = activations_dir(Path(cfg.run)), _context_limit(cfg, manifest), 0
    for record in manifest.shards:
        if seen >= limit:
            return
        if source == "cache":
            acts = {layer: load_shard(folder, manifest.select(layer, "mlp-in"), record) for layer in layers}
            tokens_CT = next(iter(acts.values())).tokens_CT.long()
        else:
            tokens_CT = load_tokens(folder, record).long()
        used = min(record.n_ctx, limit - seen)
        for start in range(0, used, cfg.batch_contexts):
            stop = min(start + cfg.batch_contexts, used)
            tokens_BT = tokens_CT[start:stop]
            ordinary_BT = ~special_mask(tokens_BT, manifest.special_token_ids)
            if source == "cache":
                inputs = {layer: acts[layer].activations_CTD[start:stop][ordinary_BT].float() for layer in layers}
            else:
                inputs = live_mlp_inputs(model, layers, tokens_BT, ordinary_BT)
            yield torch.arange(start, stop) + record.first_context, tokens_BT, ordinary_BT, inputs
        seen += used


@dataclass
class _Layer:
    """One layer being indexed: its transcoder, statistics and builder."""

    layer: int
    folder: Path
    fingerprint: str
    tc: object
    cfg: dict
    acc: FeatureAccumulator
    builder: IndexBuilder


def run_transcoder_index(cfg) -> TranscoderIndexSummary:
    """Index the chosen layers of a transcoder set (``cfg`` is jobs.index.IndexConfig); see the module docstring."""
    started = time.perf_counter()
    run_dir = Path(cfg.run)
    manifest = read_manifest(activations_dir(run_dir))
    folder = resolve_set(run_dir, cfg.transcoders)
    layers = chosen_layers(cfg.layers, read_set(folder)["layers"], folder.name)
    source = input_source(manifest, layers)
    settings = build_settings(cfg, manifest, _context_limit(cfg, manifest), source)
    with exclusive(folder / INDEX_LOCK, f"the feature indexes of transcoder set {folder}"):
        fingerprints = {layer: weights_fingerprint(layer_dir(folder, layer)) for layer in layers}
        todo = [layer for layer in layers if not is_current(layer_dir(folder, layer), fingerprints[layer], settings)]
        built, n_tokens, n_latents, encode_seconds = {}, 0, 0, 0.0
        if todo:
            built, n_tokens, n_latents, encode_seconds = _index_layers(cfg, manifest, folder, todo, fingerprints,
                                                                       settings, source)  # fmt: skip
        summaries = [built.get(layer) or _existing(layer_dir(folder, layer), layer) for layer in layers]
    if not todo:
        with FeatureIndex(summaries[0].path) as index:
            n_tokens, n_latents = int(index.metadata["tokens_indexed"]), index.n_features
    return TranscoderIndexSummary(folder.name, source, n_tokens, n_latents, cfg.dense_threshold, summaries,
                                  time.perf_counter() - started, encode_seconds)  # fmt: skip


def _existing(folder: Path, layer: int) -> LayerSummary:
    with FeatureIndex(folder / FEATURE_INDEX) as index:
        counts = index.overview()
        n_dense = index.dense_count()
    return LayerSummary(layer, folder / FEATURE_INDEX, int(counts["n_dead"]), n_dense, skipped=True)


def _index_layers(cfg, manifest, folder: Path, todo: list[int], fingerprints, settings, source):
    device = resolve_device(cfg.device)
    loaded = load_run_model(manifest, device)
    model = loaded.model.to(getattr(torch, manifest.model_dtype)) if source == "model" else None
    stream_limit = max(STREAM_MEMORY_FLOOR, memory_bytes(cfg.memory_limit) // len(todo)) // 2**20
    total = _context_limit(cfg, manifest) * manifest.ctx_len
    encode_seconds = 0.0
    with ExitStack() as stack:
        layers = []
        for layer in todo:
            tensors, tc_cfg = load_layer_files(folder, layer)
            builder = stack.enter_context(IndexBuilder(layer_dir(folder, layer), f"{stream_limit}MB", threads=1))
            tc = transcoder_from_saelens(tensors, tc_cfg).to(device).eval()
            acc = FeatureAccumulator(tc.cfg.d_sae, cfg.top_k)
            layers.append(_Layer(layer, layer_dir(folder, layer), fingerprints[layer], tc, tc_cfg, acc, builder))
        tcs = {entry.layer: entry.tc for entry in layers}
        with progress(total, f"index {folder.name} ({len(todo)} layers)") as bar:
            tick = time.perf_counter()
            for context_B, tokens_BT, ordinary_BT, inputs in _batches(cfg, manifest, todo, source, model):
                codes = encode_layers(tcs, inputs)
                encode_seconds += time.perf_counter() - tick
                where = ordinary_BT.nonzero()
                for entry in layers:
                    batch = CodeBatch.from_codes(*codes[entry.layer], context_B[where[:, 0]], where[:, 1])
                    entry.acc.update(batch, int(ordinary_BT.sum()))
                    entry.builder.add_codes(batch.feature, batch.context, batch.position, batch.value)
                    entry.builder.add_contexts(context_B, tokens_BT)
                bar.update(tokens_BT.numel())
                tick = time.perf_counter()
        vocab = vocab_strings(loaded.tokenizer, loaded.info.vocab_size)
        W_U, gamma = unembedding(loaded.model), final_norm_weight(loaded.model)
        built = {}
        with progress(len(layers), "finish layer indexes", unit="layer") as bar:
            for entry in layers:
                built[entry.layer] = _finish_layer(entry, cfg, manifest, folder.name, settings, vocab, W_U, gamma)
                bar.update(1)
    return built, layers[0].acc.n_tokens, layers[0].tc.cfg.d_sae, encode_seconds


def _finish_layer(entry: _Layer, cfg, manifest, set_name: str, settings: dict, vocab, W_U, gamma) -> LayerSummary:
    acc, builder = entry.acc, entry.builder
    builder.set_memory_limit(cfg.memory_limit)
    builder.con.execute(f"SET threads = {int(torch.get_num_threads())}")
    n_dense = int((acc.density_F() > cfg.dense_threshold).sum())
    metadata = _metadata(entry, manifest, set_name, settings, acc, n_dense, cfg)
    path = finish_index(builder, acc, entry.tc.W_dec, W_U, gamma, vocab, metadata, manifest, cfg, cfg.dense_threshold)
    return LayerSummary(entry.layer, path, int((acc.count_F == 0).sum()), n_dense, skipped=False)


def _metadata(entry: _Layer, manifest, set_name: str, settings: dict, acc, n_dense: int, cfg) -> dict:
    record, point = SaeRecord(entry.cfg), HookPoint(entry.layer, "mlp-in")
    tc = entry.tc
    return {
        "model": manifest.provenance["model"],
        "hook": {"layer": entry.layer, "name": point.name, "kind": point.kind},
        "corpus": manifest.provenance["corpus"]["description"],
        "sae": {
            "name": f"{set_name}/layer-{entry.layer:02d}",
            "architecture": tc.cfg.architecture,
            "d_in": tc.cfg.d_in,
            "d_sae": tc.cfg.d_sae,
            "k": tc.cfg.k if tc.cfg.architecture == "topk" else None,
            "trained_architecture": record.trained_architecture,
            "weights_sha256": entry.fingerprint,
        },
        "transcoder": {"set": set_name, "layer": entry.layer, "writes": record.meta.get("hook_name_out")},
        "transcoder_index": settings,
        "dense": {"threshold": cfg.dense_threshold, "n_dense": n_dense, "measure": "density (share of tokens)"},
        "metrics": record.metrics,
        "tokens_indexed": acc.n_tokens,
        "top_k": cfg.top_k,
    }


def format_summary(summary: TranscoderIndexSummary, run: str) -> str:
    built = [entry for entry in summary.layers if not entry.skipped]
    skipped = [entry.layer for entry in summary.layers if entry.skipped]
    rate = summary.n_tokens * len(built) / max(summary.seconds, 1e-9)
    dense = sum(entry.n_dense for entry in summary.layers)
    dead = sum(entry.n_dead for entry in summary.layers)
    n_all = summary.n_latents * len(summary.layers)
    lines = [
        f"indexed {len(built)} layers of {summary.set_name} x {human_count(summary.n_tokens)} tokens in "
        f"{summary.seconds:.0f}s ({rate:,.0f} layer-tokens/s; inputs from the {summary.source}, "
        f"encoding {summary.encode_seconds:.0f}s)",
        f"  {n_all - dead:,} live, {dead:,} dead, {dense:,} dense (density > {summary.dense_threshold:g}) "
        f"of {n_all:,} latents",
    ]
    if skipped:
        lines.append(f"  layers {skipped} were already indexed with these weights and settings (skipped)")
    if summary.layers:
        lines.append(f"  indexes in {summary.layers[0].path.parent.parent}/layer-LL/{FEATURE_INDEX}")
    lines.append(f"next: saescope explain --run {run} --transcoders {summary.set_name} --graphs all")
    return "\n".join(lines)
