"""Options of `saescope cache`, the hook points they name, and the check that a re-run asks for the same cache.

``requested_points`` turns --hook/--hooks and --layer/--layers into hook points
(block by block); ``primary_point`` is the one readers get unless they pick.
``check_same_request`` refuses to add to a cache made with another model, other
points, ctx-len, corpus, dtype or shard size, naming each difference.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from jobs.options import ConfigError, config_to_mapping, option, require
from pipeline.lm.corpus import CorpusSpec
from pipeline.lm.hook_points import KINDS, HookPoint, parse_layers
from pipeline.lm.hooks import check_layer
from storage.shards import CacheError, CacheManifest

DEFAULT_SHARD_TOKENS = 32768


@dataclass(frozen=True)
class CacheConfig:
    """Options of `saescope cache`."""

    run: str = option(help="run directory, e.g. runs/demo")
    model: str = option(
        "default",
        "'default' (SmolLM2-135M-Instruct, offline), 'gemma3-270m' (Gemma 3 270M, offline once installed: see the "
        "README), a hub id, a model folder or a .gguf file",
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
        if self.layers is not None:
            check_layers_text(self.layers)

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


LAYERS_TEXT = re.compile(r"\s*(all|\d+(-\d+)?(\s*,\s*\d+(-\d+)?)*)\s*")


def check_layers_text(text: str, flag: str = "--layers") -> None:
    """A ConfigError naming ``flag`` unless ``text`` reads as all, 5, 0-29 or 1,3,8-10 with no backwards range.

    Only the form is checked here, before any model loads; the range is checked against the model's layers.
    """
    if not text.strip():
        raise ConfigError(f"{flag} is empty: give all, 5, 0-29 or 1,3,8-10")
    if not LAYERS_TEXT.fullmatch(text):
        raise ConfigError(f"{flag}: cannot read layers {text!r}: use all, 5, 0-29 or 1,3,8-10")
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if last and int(first) > int(last):
            raise ConfigError(f"{flag}: layer range {part.strip()!r} is backwards")


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


def cached_points(manifest: CacheManifest) -> tuple[HookPoint, ...]:
    return tuple(HookPoint(int(p["layer"]), p.get("kind", "resid-post")) for p in manifest.hook_points)


def _recorded_request(manifest: CacheManifest) -> dict:
    prov = manifest.provenance
    return {
        "model": prov["model"]["spec"],
        "hook points": tuple(point.name for point in cached_points(manifest)),
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


def check_same_content(manifest: CacheManifest, provenance: dict, run: str) -> None:
    for part, key in (("model", "revision"), ("corpus", "fingerprint")):
        before, now = manifest.provenance[part][key], provenance[part][key]
        if before != now:
            raise CacheError(
                f"{run}: the {part} changed since this cache was started ({key} {before} -> {now}); "
                "use a new --run folder"
            )
