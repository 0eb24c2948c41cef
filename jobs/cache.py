"""`saescope cache`: run a model over a corpus and store the activations at one or many hook points.

The hook point is ``--hook`` (resid-post, attn-out, mlp-in or mlp-out; see
``pipeline.lm.hook_points``) of block ``--layer``; ``--hooks`` and ``--layers`` name
several kinds and blocks, all cached from the same forward, which stops after the
deepest block. Every shard then holds one tensor per point (``storage.shards``),
and readers pick one (``CacheManifest.select``: `train --hook --layer`; an SAE's
own hook point for index, eval and the dashboard).

Resumable: contexts come in a fixed order, shards are published atomically and
listed in the manifests only once complete, so re-running the same command
continues at the first unfinished shard and yields the same cache as an
uninterrupted run. A different model, layer, ctx-len, corpus or dtype on an
existing cache is refused rather than mixed in (so is a different hook).

Under `torchrun` each rank computes its share of the unfinished shards
(jobs.cache_shards), writes them under its own prefix (w00, w01, ...) with its own
``manifest.wNN.json``; after a barrier rank 0 merges them into ``manifest.json``.
The cache lists the same contexts in the same order as a one-process run, and
a partial cache resumes under any world size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from jobs.cache_request import (
    CacheConfig,
    cached_points,
    check_same_content,
    check_same_request,
    primary_point,
    requested_points,
)
from jobs.cache_shards import ShardSink, compute_shards, plan_shards
from jobs.console import human_bytes, human_count
from jobs.options import add_config_arguments, config_from_args, config_to_mapping
from jobs.torchrun import agreed_dtype, exclusive_on_main
from pipeline.lm.corpus import CorpusError, check_corpus, fingerprint
from pipeline.lm.hook_points import HookPoint, check_points
from pipeline.lm.models import LoadedModel, load_model
from pipeline.lm.packing import SpecialTokens
from pipeline.runtime.distributed import Group, from_environment, is_main_process
from pipeline.runtime.precision import DtypeChoice, resolve_device
from storage.atomic import remove_stale_temps
from storage.constants import CACHE_LOCK
from storage.home import converted_models_dir
from storage.run_config import update_run_config
from storage.shards import (
    STORAGE_DTYPES,
    CacheError,
    CacheManifest,
    activations_dir,
    check_shard_sizes,
    check_whole_shard,
    describe_points,
    read_manifest,
    write_manifest,
)
from storage.writer_manifests import merged_manifest, read_cache_state, remove_writer_manifests


@dataclass(frozen=True)
class CacheSummary:
    """What a cache run did."""

    run_dir: Path
    manifest: CacheManifest
    new_tokens: int
    seconds: float
    already_done: bool
    corpus_exhausted: bool


def _hook_entry(point: HookPoint) -> dict:
    return {"layer": point.layer, "name": point.name, "kind": point.kind}


def _provenance(
    cfg: CacheConfig,
    loaded: LoadedModel,
    points: tuple[HookPoint, ...],
    choice: DtypeChoice,
    device: torch.device,
) -> dict:
    special = SpecialTokens.from_tokenizer(loaded.tokenizer)
    primary = primary_point(points, loaded.info.default_layer)
    provenance = {
        "model": loaded.info.as_dict(),
        "tokenizer": {
            "name": loaded.info.name,
            "vocab_size": len(loaded.tokenizer),
            "bos_token_id": special.bos_id,
            "separator_token_id": special.separator_id,
        },
        "hook": _hook_entry(primary),
        "corpus": {
            "spec": config_to_mapping(cfg.corpus),
            "description": cfg.corpus.describe(),
            "fingerprint": fingerprint(cfg.corpus),
        },
        "model_dtype": choice.as_dict(),
        "device": str(device),
    }
    if len(points) > 1:
        provenance["hooks"] = [_hook_entry(point) for point in points]
    return provenance


def _new_manifest(cfg: CacheConfig, loaded: LoadedModel, provenance: dict, n_points: int) -> CacheManifest:
    return CacheManifest(
        provenance=provenance,
        d_model=loaded.info.d_model,
        ctx_len=cfg.ctx_len,
        dtype=cfg.dtype,
        special_token_ids=SpecialTokens.from_tokenizer(loaded.tokenizer).special_ids,
        shard_contexts=cfg.shard_contexts(n_points),
    )


def _is_finished(manifest: CacheManifest, cfg: CacheConfig) -> bool:
    return manifest.complete and (
        manifest.n_contexts >= cfg.target_contexts or manifest.extra.get("corpus_exhausted", False)
    )


def check_run_folder(run_dir: Path) -> None:
    """A --run that exists must be a folder."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CacheError(f"--run {run_dir} is a file, not a run folder: choose another path")


def run_cache(cfg: CacheConfig, background_writes: bool = True) -> CacheSummary:
    """Cache activations for ``cfg``, resuming or refusing as the module docstring says."""
    run_dir = Path(cfg.run)
    check_run_folder(run_dir)
    device = resolve_device(cfg.device)
    _, done = _existing_cache(cfg, run_dir)  # read-only: a finished cache needs no corpus, model or lock
    if done is not None:
        return done
    check_corpus(cfg.corpus)  # a missing or empty corpus fails here, before a model loads or a file is written
    group = from_environment(device)
    with exclusive_on_main(group, run_dir / CACHE_LOCK, f"the activation cache of {run_dir}"):
        return _run_cache_locked(cfg, run_dir, group, background_writes)


def _existing_cache(cfg: CacheConfig, run_dir: Path) -> tuple[CacheManifest | None, CacheSummary | None]:
    """(the cache to continue or None, a summary when it is already finished) after checking the request."""
    state = read_cache_state(activations_dir(run_dir))
    if state is None or not state[1]:
        return None, None  # nothing finished yet: the cache may restart with other options
    existing = state[0]
    check_same_request(existing, cfg)
    if _is_finished(existing, cfg):
        return existing, CacheSummary(run_dir, existing, 0, 0.0, True, existing.extra.get("corpus_exhausted", False))
    # every listed shard must be there at its size; the last one (where a killed job stopped and this one
    # continues) is also hashed: one shard, not the whole cache
    check_shard_sizes(activations_dir(run_dir), existing)
    if existing.shards:
        check_whole_shard(activations_dir(run_dir), existing, existing.shards[-1])
    return existing, None


def _load(cfg: CacheConfig, existing: CacheManifest | None, group: Group):
    device = group.device(resolve_device(cfg.device))
    recorded = existing.model_dtype if existing else cfg.model_dtype
    choice = agreed_dtype(group, recorded, device)
    loaded = load_model(cfg.model, device=device, dtype=choice.dtype, convert_dir=converted_models_dir())
    points = cached_points(existing) if existing is not None else _new_points(cfg, loaded)
    try:
        check_points(loaded.model, points)
    except ValueError as error:
        raise CacheError(str(error)) from error
    max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if max_positions is not None and cfg.ctx_len > max_positions:
        raise CacheError(f"--ctx-len {cfg.ctx_len} is beyond the model's {max_positions} positions")
    provenance = _provenance(cfg, loaded, points, choice, device)
    if existing is not None:
        check_same_content(existing, provenance, cfg.run)
        provenance["model_dtype"] = existing.provenance["model_dtype"]
    return loaded, points, existing or _new_manifest(cfg, loaded, provenance, len(points))


def _new_points(cfg: CacheConfig, loaded: LoadedModel) -> tuple[HookPoint, ...]:
    default = HookPoint(loaded.info.default_layer, "resid-post")
    try:
        return requested_points(cfg, loaded.info.n_layers, default)
    except ValueError as error:
        raise CacheError(f"--{'layers' if cfg.layers is not None else 'layer'}: {error}") from error


def _resolved(cfg: CacheConfig, header: CacheManifest, points: tuple[HookPoint, ...]) -> CacheConfig:
    """``cfg`` with every default filled in, as run.toml records it."""
    shard_tokens = header.shard_contexts * header.ctx_len
    if len(points) == 1:
        return replace(cfg, layer=points[0].layer, hook=points[0].kind, shard_tokens=shard_tokens)
    kinds = ",".join(dict.fromkeys(point.kind for point in points))
    layers = ",".join(str(layer) for layer in dict.fromkeys(point.layer for point in points))
    return replace(cfg, layer=None, hook=None, hooks=kinds, layers=layers, shard_tokens=shard_tokens)


def _prepare_folder(
    cfg: CacheConfig, run_dir: Path, header: CacheManifest, points: tuple[HookPoint, ...], fresh: bool
) -> None:
    """Rank 0, before any rank writes: run.toml, stale temp files and per-writer lists, a manifest to merge into."""
    folder = activations_dir(run_dir)
    resolved = replace(_resolved(cfg, header, points), model_dtype=header.model_dtype)
    update_run_config(run_dir, "cache", config_to_mapping(resolved))
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    if fresh:
        remove_writer_manifests(folder)
    write_manifest(folder, replace(header, complete=False))


def _run_cache_locked(cfg: CacheConfig, run_dir: Path, group: Group, background_writes: bool) -> CacheSummary:
    folder = activations_dir(run_dir)
    existing, done = _existing_cache(cfg, run_dir)  # again under the lock: another job may have moved it on
    if done is not None:
        return done
    loaded, points, header = _load(cfg, existing, group)
    if group.is_main:
        _prepare_folder(cfg, run_dir, header, points, fresh=existing is None)
    group.barrier()
    _, records, end = read_cache_state(folder)
    before = sum(record.n_ctx for record in records.values())
    tasks = plan_shards(records, _context_limit(cfg, end), header.shard_contexts, group)
    writer = group.writer if group.distributed else cfg.writer
    sink = ShardSink(folder, header, writer, group, cfg.dtype, background_writes, records)
    start = time.perf_counter()
    compute_shards(loaded.model, loaded.tokenizer, cfg.corpus, tasks, points, cfg.batch_size, cfg.ctx_len, sink)
    group.barrier()  # every rank's shards are published
    seconds = time.perf_counter() - start
    manifest, end = _finish(cfg, folder, group)
    new_tokens = (manifest.n_contexts - before) * cfg.ctx_len
    return CacheSummary(run_dir, manifest, max(0, new_tokens), seconds, False, end is not None)


def _context_limit(cfg: CacheConfig, corpus_end: int | None) -> int:
    """Contexts the finished cache holds: the target, or fewer where the corpus ran out."""
    return cfg.target_contexts if corpus_end is None else min(cfg.target_contexts, corpus_end)


def _finish(cfg: CacheConfig, folder: Path, group: Group) -> tuple[CacheManifest, int | None]:
    """Rank 0 merges every writer's shards into a complete manifest.json; the other ranks then read it."""
    if group.is_main:
        _merge_complete(cfg, folder)
    group.barrier()
    manifest = read_manifest(folder)
    return manifest, manifest.extra.get("exhausted_at")


def _merge_complete(cfg: CacheConfig, folder: Path) -> None:
    merged, records, end = read_cache_state(folder)
    manifest = merged_manifest(merged, records, end)
    limit = _context_limit(cfg, end)
    if manifest.n_contexts == 0:
        raise CorpusError(
            f"corpus {cfg.corpus.describe()!r} holds too little text for one context of {cfg.ctx_len} tokens"
        )
    if manifest.n_contexts < limit:
        raise CacheError(
            f"{folder}: contexts {manifest.n_contexts}-{limit} are missing after every rank finished; "
            "re-run the same command to compute them"
        )
    extra = {**manifest.extra, "target_tokens": cfg.target_contexts * cfg.ctx_len, "corpus_exhausted": end is not None}
    write_manifest(folder, replace(manifest, complete=True, extra=extra))
    remove_writer_manifests(folder)


def format_summary(summary: CacheSummary) -> str:
    """The end-of-job report: what is where, how fast, and what to run next."""
    m = summary.manifest
    prov = m.provenance
    size = sum(record.n_bytes for record in m.shards)
    lines = []
    if summary.already_done:
        lines.append(
            f"{summary.run_dir}: activation cache already complete ({human_count(m.n_tokens)} tokens); nothing to do."
        )
    else:
        rate = summary.new_tokens / summary.seconds if summary.seconds else 0.0
        lines.append(
            f"cached {human_count(summary.new_tokens)} new tokens in {summary.seconds:.0f}s ({rate:,.0f} tokens/s)"
        )
    if summary.corpus_exhausted:
        asked = human_count(m.extra.get("target_tokens", 0))
        lines.append(f"note: the corpus ran out at {human_count(m.n_tokens)} tokens (asked for {asked})")
    model, dtype = prov["model"], prov["model_dtype"]
    lines += [
        f"  model      {model['name']} ({model['source']}), {_points_line(m)}, d_model {m.d_model}",
        f"  compute    {dtype['name']} ({dtype['reason']})",
        f"  corpus     {prov['corpus']['description']}",
        f"  cache      {activations_dir(summary.run_dir)}: {len(m.shards)} shards, "
        f"{m.n_contexts} contexts x {m.ctx_len} tokens, {m.dtype}, {human_bytes(size)}",
        f"next: saescope verify --run {summary.run_dir}   |   saescope train --run {summary.run_dir}"
        + (" --hook KIND --layer L" if len(m.hook_points) > 1 else ""),
    ]
    return "\n".join(lines)


def _points_line(m: CacheManifest) -> str:
    if len(m.hook_points) == 1:
        return m.hook_name
    per_token = m.d_model * STORAGE_DTYPES[m.dtype].itemsize
    return (
        f"{len(m.hook_points)} hook points ({describe_points(m.hook_points)}; "
        f"{human_bytes(per_token)} a token each; readers default to {m.hook_name})"
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser("cache", help="cache a model's activations at one or many hook points as shards")
    add_config_arguments(parser, CacheConfig)
    parser.set_defaults(handler=command)


def command(args) -> int:
    summary = run_cache(config_from_args(CacheConfig, args))
    if is_main_process():
        print(format_summary(summary))
    return 0
