"""`saescope import-sae`: bring an SAE (SAELens or sparsify format) or a transcoder set into a run.

A SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) or a sparsify SAE
(``layers.L/`` with ``cfg.json`` + ``sae.safetensors``) becomes an SAE of the run,
checked against the cache's width and layer. sparsify transcoders (``layers.L.mlp/``
folders with ``transcode: true``, e.g. EleutherAI's skip transcoders of SmolLM2)
become a transcoder set of the run (``transcoders/NAME/layer-LL``), for `saescope trace`.
circuit-tracer folders (``config.yaml``: per-layer sets and cross-layer transcoders) and
SAELens / Gemma Scope transcoder folders go through ``jobs.import_transcoders``. PATH may be
``hf://owner/repo[/sub]`` for any of them (downloaded through huggingface_hub; refused offline).
sparsify's cross-layer coders (``n_targets`` > 0, on its experimental ``clt`` branch) are refused.
Nothing is written until every check passes: a safe ``--name``, finite weights
(NaN or infinity would give FVU nan and L0 0 downstream), well-typed cfg.json
fields, and one width for all layers of a set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from jobs.import_transcoders import import_transcoder_set, looks_like_transcoders
from jobs.options import POSITIONAL, add_config_arguments, config_from_args, option
from jobs.run import (
    as_read_by,
    at_point,
    cache_hook_point,
    check_finite,
    check_fits_cache,
    read_sae,
    saelens_meta,
    write_sae,
)
from pipeline.sae.sparsify import coder_from_sparsify, hook_point_of
from pipeline.sae.transcoder_format import transcoder_cfg_dict, transcoder_tensors
from storage.constants import TRANSCODER_SET
from storage.sae_store import SaeStoreError, check_name, is_finished, sae_dir, save_sae
from storage.shards import activations_dir, read_manifest
from storage.sparsify_files import SPARSIFY_WEIGHTS, coder_folders, is_sparsify, load_coder
from storage.transcoder_sources import is_hub, local_folder, source_layout
from storage.transcoder_store import layer_dir, set_dir, write_set


@dataclass(frozen=True)
class ImportConfig:
    """Options of `saescope import-sae`."""

    path: str = option(
        help="SAELens folder (cfg.json + sae_weights.safetensors), a sparsify coder folder or folder of them, a "
        "circuit-tracer folder (config.yaml) or SAELens / Gemma Scope transcoder folders; local or hf://owner/repo[/sub]",
        flag=POSITIONAL,
    )
    run: str = option(help="run directory whose cache the SAE reads")
    name: str | None = option(None, "name inside the run (default: the folder's name)")
    force: bool = option(False, "replace an SAE or transcoder set of the same name")
    transcoders: bool = option(
        False, "PATH is a transcoder set (SAELens transcoders are found by their cfg.json; use this for others)"
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser("import-sae", help="add an SAE or a transcoder set (SAELens, sparsify, "
                                   "circuit-tracer, Gemma Scope) to a run")  # fmt: skip
    add_config_arguments(parser, ImportConfig)
    parser.set_defaults(handler=lambda args: command(config_from_args(ImportConfig, args)))


def _default_name(spec: str) -> str:
    last = spec.rstrip("/").split("@")[0].rsplit("/", 1)[-1] if is_hub(spec) else Path(spec).resolve().name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", last).lstrip(".") or "imported"


def command(args: ImportConfig) -> int:
    run_dir = Path(args.run)
    manifest = read_manifest(activations_dir(run_dir))
    name = check_name(_default_name(args.path) if args.name is None else args.name, "SAE or transcoder set")
    source = local_folder(args.path)
    layout = source_layout(source)
    if layout == "circuit-tracer" or (layout == "saelens" and (args.transcoders or looks_like_transcoders(source))):
        return import_transcoder_set(source, layout, args.path, run_dir, manifest, name, args.force)
    if args.transcoders:
        raise SaeStoreError(f"{args.path} holds no transcoder set: expected a circuit-tracer folder (config.yaml) or "
                            "SAELens / Gemma Scope transcoder folders")  # fmt: skip
    if is_sparsify(source):
        return import_sparsify(source, run_dir, manifest, name, args.force)
    sae, cfg = read_sae(source)
    manifest = as_read_by(manifest, cfg)
    check_fits_cache(cfg, manifest, source)
    target = sae_dir(run_dir, name)
    if is_finished(target) and not args.force:
        raise SaeStoreError(f"{run_dir} already has an SAE named {name!r}: pass --name or --force")
    meta = dict(cfg.get("meta") or {})
    meta.setdefault("hook_layer", manifest.layer)
    meta.setdefault("hook_name", manifest.hook_name)
    record = {
        "format_version": 1,
        "imported_from": str(source.resolve()),
        "source_cfg": cfg,
        "model": manifest.provenance["model"],
        "hook": manifest.provenance["hook"],
    }
    write_sae(target, sae, meta, record, None)
    print(f"imported {source} as {target} ({sae.cfg.architecture}, d_sae {sae.cfg.d_sae})")
    print(f"next: saescope eval --run {run_dir} --sae {name}   |   saescope index --run {run_dir} --sae {name}")
    return 0


def import_sparsify(source: Path, run_dir: Path, manifest, name: str, force: bool) -> int:
    """sparsify coders: SAEs of the cached layer, or transcoders into a set (all checked before writing)."""
    coders = {}
    for hookpoint, folder in coder_folders(source).items():
        tensors, cfg = load_coder(folder)
        if cfg.get("n_targets") or cfg.get("cross_layer"):
            raise SaeStoreError(
                f"{folder} is a sparsify cross-layer coder (n_targets {cfg.get('n_targets')}): not supported yet; "
                "import a circuit-tracer cross-layer transcoder (config.yaml + W_enc_i/W_dec_i) instead"
            )
        check_finite(tensors, folder / SPARSIFY_WEIGHTS)
        try:
            point = hook_point_of(hookpoint, bool(cfg.get("transcode", False)))
            coders[point] = coder_from_sparsify(tensors, cfg)
        except ValueError as error:
            raise SaeStoreError(f"{folder}: {error}") from error
        if coders[point].cfg.d_in != manifest.d_model:
            raise SaeStoreError(f"{folder} reads d_in={coders[point].cfg.d_in} but the model has {manifest.d_model}")
    kinds = {point.kind for point in coders}
    if kinds == {"mlp-in"}:
        return _import_transcoders(source, run_dir, manifest, name, force, {p.layer: c for p, c in coders.items()})
    if len(coders) != 1 or kinds != {"resid-post"}:
        raise SaeStoreError(f"{source}: import one sparsify SAE at a time, or a folder of transcoders only")
    ((point, sae),) = coders.items()
    manifest = at_point(manifest, point)
    if point.layer != manifest.layer:
        raise SaeStoreError(f"{source} was trained on layer {point.layer} but the cache holds layer {manifest.layer}")
    if point != cache_hook_point(manifest):
        raise SaeStoreError(f"{source} reads {point.name} but the cache holds {cache_hook_point(manifest).name}")
    target = sae_dir(run_dir, name)
    if is_finished(target) and not force:
        raise SaeStoreError(f"{run_dir} already has an SAE named {name!r}: pass --name or --force")
    record = {"format_version": 1, "imported_from": str(source.resolve()), "source_format": "sparsify",
              "model": manifest.provenance["model"], "hook": manifest.provenance["hook"]}  # fmt: skip
    write_sae(target, sae, saelens_meta(manifest), record, None)
    print(f"imported sparsify SAE {source} as {target} (topk, d_sae {sae.cfg.d_sae}, k {sae.cfg.k})")
    return 0


def _import_transcoders(source, run_dir, manifest, name, force, tcs: dict) -> int:
    n_layers = int(manifest.provenance["model"]["n_layers"])
    beyond = [layer for layer in tcs if layer >= n_layers]
    if beyond:
        raise SaeStoreError(f"{source} has transcoders for layer {beyond[0]} but the model has {n_layers} layers")
    widths = {layer: tc.cfg.d_sae for layer, tc in sorted(tcs.items())}
    if len(set(widths.values())) > 1:
        shown = ", ".join(f"layer {layer}: {width}" for layer, width in widths.items())
        raise SaeStoreError(
            f"{source}: a transcoder set has one width, but these layers differ ({shown}): "
            "import the layers of one width into a folder of their own"
        )
    folder = set_dir(run_dir, name)
    if (folder / TRANSCODER_SET).is_file() and not force:
        raise SaeStoreError(f"{run_dir} already has a transcoder set named {name!r}: pass --name or --force")
    meta = saelens_meta(manifest)
    record = {"format_version": 1, "imported_from": str(source.resolve()), "source_format": "sparsify"}
    for layer, tc in sorted(tcs.items()):
        save_sae(layer_dir(folder, layer), transcoder_tensors(tc), transcoder_cfg_dict(tc, layer, meta, record))
    layers = sorted(tcs)
    write_set(folder, {**record, "layers": layers, "d_sae": next(iter(tcs.values())).cfg.d_sae, "metrics": {}})
    print(f"imported {len(layers)} sparsify transcoders (layers {layers[0]}-{layers[-1]}) as {folder}")
    print(f"next: saescope trace --run {run_dir} --transcoders {name} --prompt 'The capital of France is'")
    return 0
