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

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from jobs.cache_shards import ShardSink, compute_shards, plan_shards
from jobs.console import human_bytes, human_count
from jobs.options import add_config_arguments, config_from_args, config_to_mapping, option, require
from jobs.torchrun import agreed_dtype, exclusive_on_main
from pipeline.lm.corpus import CorpusError, CorpusSpec, check_corpus, fingerprint
from pipeline.lm.hook_points import KINDS, HookPoint, parse_layers
from pipeline.lm.hooks import check_layer
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
    describe_points,
    read_manifest,
    write_manifest,
)
from storage.writer_manifests import merged_manifest, read_cache_state, remove_writer_manifests

DEFAULT_SHARD_TOKENS = 32768


@dataclass(frozen=True)
class CacheConfig:
    """Options of `saescope cache`."""

    run: str = option(help="run directory, e.g. runs/demo")
    model: str = option(
        "default", "'default' (SmolLM2-135M-Instruct, offline), a hub id, a model folder or a .gguf file"
    )
    layer: int | None = option(None, "cache a hook point of this block (0-based; default: the middle block)")
    layers: str | None = option(
        None, "cache these blocks from one forward instead: all, 5, 0-29 or 1,3,8-10 (see the README for the disk cost)"
    )
    hook: Literal["resid-post", "attn-out", "mlp-in", "mlp-out"] | None = option(
        None,
        "which point of the block: resid-post (its output), attn-out (attention output), mlp-in (MLP input, "
        "normed), mlp-out (MLP output); default: the existing cache's, else resid-post",
    )
    hooks: str | None = option(
        None, "cache several kinds from one forward instead, comma-separated, e.g. resid-post,mlp-in,mlp-out"
    )
    dataset: str = option(
        "default", "'default' (Python's own docs, offline), a hub dataset, or .txt/.jsonl/.parquet files"
    )
    dataset_config: str | None = option(None, "hub dataset configuration name")
    split: str = option("train", "dataset split")
    text_column: str = option("text", "column holding the text")
    tokens: int = option(1_000_000, "positions to cache (BOS included); stops early if the corpus runs out")
    ctx_len: int = option(128, "tokens per context")
    batch_size: int = option(8, "contexts per forward pass")
    dtype: Literal["float16", "bfloat16", "float32"] = option("float16", "storage dtype of the activations")
    model_dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto", "model compute dtype; auto measures which is faster here"
    )
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    shard_tokens: int | None = option(
        None, "tokens per shard file (rounded down to whole contexts); default 32768 divided by the points cached"
    )
    writer: str = option("w00", "shard-name prefix of this process")

    def __post_init__(self):
        require(self.tokens > 0, f"--tokens must be positive, got {self.tokens}")
        require(self.ctx_len >= 2, f"--ctx-len must be at least 2, got {self.ctx_len}")
        require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        require(
            self.shard_tokens is None or self.shard_tokens >= self.ctx_len,
            f"--shard-tokens ({self.shard_tokens}) must hold one context ({self.ctx_len})",
        )
        require(self.layer is None or self.layer >= 0, f"layer {self.layer} out of range: layers are numbered from 0")
        require(self.writer.isalnum(), f"--writer must be alphanumeric, got {self.writer!r}")
        known = ", ".join(KINDS)
        require(self.hook is None or self.hook in KINDS, f"--hook {self.hook!r} is unknown: use one of {known}")
        require(self.hook is None or self.hooks is None, "give --hook (one kind) or --hooks (several), not both")
        require(self.layer is None or self.layers is None, "give --layer (one block) or --layers (several), not both")
        for kind in self.hook_kinds or ():
            require(kind in KINDS, f"--hooks {self.hooks!r}: {kind!r} is unknown: use {known}, comma-separated")
        kinds = self.hook_kinds or ()
        require(len(set(kinds)) == len(kinds), f"--hooks {self.hooks!r} names a kind twice")
        try:
            parse_layers(self.layers or "0", 10**6)
        except ValueError as error:
            require(False, f"--layers: {error}")

    @property
    def hook_kinds(self) -> tuple[str, ...] | None:
        """The kinds --hooks names, or None."""
        return None if self.hooks is None else tuple(kind.strip() for kind in self.hooks.split(","))

    @property
    def names_points(self) -> bool:
        """Whether any of --hook, --hooks, --layer, --layers was given."""
        return any(value is not None for value in (self.hook, self.hooks, self.layer, self.layers))

    def shard_contexts(self, n_points: int) -> int:
        """Contexts per shard: --shard-tokens, else 32768 tokens shared by the points (at least one context)."""
        tokens = self.shard_tokens if self.shard_tokens is not None else DEFAULT_SHARD_TOKENS // n_points
        return max(1, tokens // self.ctx_len)

    @property
    def target_contexts(self) -> int:
        return math.ceil(self.tokens / self.ctx_len)

    @property
    def corpus(self) -> CorpusSpec:
        return CorpusSpec(self.dataset, self.dataset_config, self.split, self.text_column)


@dataclass(frozen=True)
class CacheSummary:
    """What a cache run did."""

    run_dir: Path
    manifest: CacheManifest
    new_tokens: int
    seconds: float
    already_done: bool
    corpus_exhausted: bool


def requested_points(cfg: CacheConfig, n_layers: int, default: HookPoint) -> tuple[HookPoint, ...]:
    """The points ``cfg`` names, block by block; ``default`` fills a kind or block it leaves out.

    ValueError (naming the range) for a block the model lacks.
    """
    kinds = cfg.hook_kinds or (cfg.hook or default.kind,)
    if cfg.layers is not None:
        layers = parse_layers(cfg.layers, n_layers)
    else:
        layers = (check_layer(default.layer if cfg.layer is None else cfg.layer, n_layers),)
    return tuple(HookPoint(layer, kind) for layer in layers for kind in kinds)


def primary_point(points: tuple[HookPoint, ...], default_layer: int) -> HookPoint:
    """The point readers get unless they pick: the first kind, at the default block when cached, else the first."""
    kind = points[0].kind
    return HookPoint(default_layer, kind) if HookPoint(default_layer, kind) in points else points[0]


def _cached_points(manifest: CacheManifest) -> tuple[HookPoint, ...]:
    return tuple(HookPoint(int(p["layer"]), p.get("kind", "resid-post")) for p in manifest.hook_points)


def _recorded_request(manifest: CacheManifest) -> dict:
    prov = manifest.provenance
    return {
        "model": prov["model"]["spec"],
        "hook points": tuple(point.name for point in _cached_points(manifest)),
        "ctx_len": manifest.ctx_len,
        "corpus": prov["corpus"]["spec"],
        "dtype": manifest.dtype,
        "shard_contexts": manifest.shard_contexts,
        "model_dtype": prov["model_dtype"]["name"],
    }


def _requested_names(cfg: CacheConfig, manifest: CacheManifest, recorded: dict) -> tuple[str, ...]:
    if not cfg.names_points:
        return recorded["hook points"]
    primary = HookPoint(manifest.layer, manifest.hook_kind)
    try:
        points = requested_points(cfg, int(manifest.provenance["model"]["n_layers"]), primary)
    except ValueError as error:
        raise CacheError(f"--layer/--layers: {error}") from error
    return tuple(point.name for point in points)


def _requested(cfg: CacheConfig, manifest: CacheManifest, recorded: dict) -> dict:
    n_points = len(recorded["hook points"])
    return {
        "model": cfg.model,
        "hook points": _requested_names(cfg, manifest, recorded),
        "ctx_len": cfg.ctx_len,
        "corpus": config_to_mapping(cfg.corpus),
        "dtype": cfg.dtype,
        "shard_contexts": recorded["shard_contexts"] if cfg.shard_tokens is None else cfg.shard_contexts(n_points),
        "model_dtype": recorded["model_dtype"] if cfg.model_dtype == "auto" else cfg.model_dtype,
    }


def check_same_request(manifest: CacheManifest, cfg: CacheConfig) -> None:
    """Refuse to add to a cache made with a different model, hook points, ctx-len, corpus or dtype."""
    recorded = _recorded_request(manifest)
    requested = _requested(cfg, manifest, recorded)
    differences = [
        f"{key}: cache has {_shown(recorded[key])}, requested {_shown(requested[key])}"
        for key in recorded
        if recorded[key] != requested[key]
    ]
    if differences:
        raise CacheError(
            f"{cfg.run} already holds a different activation cache ({'; '.join(differences)}); "
            "use a new --run folder, or repeat the original options"
        )


def _shown(value) -> str:
    if not isinstance(value, tuple):
        return repr(value)
    if len(value) > 4:
        return f"{', '.join(value[:2])}, ... {value[-1]} ({len(value)} points)"
    return ", ".join(value)


def _check_same_content(manifest: CacheManifest, provenance: dict, run: str) -> None:
    for part, key in (("model", "revision"), ("corpus", "fingerprint")):
        before, now = manifest.provenance[part][key], provenance[part][key]
        if before != now:
            raise CacheError(
                f"{run}: the {part} changed since this cache was started ({key} {before} -> {now}); "
                "use a new --run folder"
            )


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
    return existing, None


def _load(cfg: CacheConfig, existing: CacheManifest | None, group: Group):
    device = group.device(resolve_device(cfg.device))
    recorded = existing.model_dtype if existing else cfg.model_dtype
    choice = agreed_dtype(group, recorded, device)
    loaded = load_model(cfg.model, device=device, dtype=choice.dtype, convert_dir=converted_models_dir())
    points = _cached_points(existing) if existing is not None else _new_points(cfg, loaded)
    max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if max_positions is not None and cfg.ctx_len > max_positions:
        raise CacheError(f"--ctx-len {cfg.ctx_len} is beyond the model's {max_positions} positions")
    provenance = _provenance(cfg, loaded, points, choice, device)
    if existing is not None:
        _check_same_content(existing, provenance, cfg.run)
        provenance["model_dtype"] = existing.provenance["model_dtype"]
    return loaded, points, existing or _new_manifest(cfg, loaded, provenance, len(points))


def _new_points(cfg: CacheConfig, loaded: LoadedModel) -> tuple[HookPoint, ...]:
    default = HookPoint(loaded.info.default_layer, "resid-post")
    try:
        return requested_points(cfg, loaded.info.n_layers, default)
    except ValueError as error:
        raise CacheError(f"--{'layers' if cfg.layers else 'layer'}: {error}") from error


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
