"""`saescope import-sae`: bring a SAELens-format SAE folder into a run, to evaluate, index and steer it."""

from __future__ import annotations

import re
from pathlib import Path

from jobs.sae_io import hook_layer_of, read_sae, write_sae
from storage.sae_store import SaeStoreError, is_finished, sae_dir
from storage.shards import activations_dir, read_manifest


def register(subparsers) -> None:
    parser = subparsers.add_parser("import-sae", help="add a SAELens-format SAE folder to a run")
    parser.add_argument("path", help="folder with cfg.json and sae_weights.safetensors")
    parser.add_argument("--run", required=True, help="run directory whose cache the SAE reads")
    parser.add_argument("--name", default=None, help="name inside the run (default: the folder's name)")
    parser.add_argument("--force", action="store_true", help="replace an SAE of the same name")
    parser.set_defaults(handler=command)


def check_fits_cache(cfg: dict, manifest, source: Path) -> None:
    """The SAE must read activations of the cache's width and hook."""
    if int(cfg["d_in"]) != manifest.d_model:
        raise SaeStoreError(f"{source} reads d_in={cfg['d_in']} but the cache holds d_model={manifest.d_model}")
    layer, cached = hook_layer_of(cfg), manifest.provenance["hook"]["layer"]
    if layer is not None and layer != cached:
        raise SaeStoreError(f"{source} was trained on layer {layer} but the cache holds layer {cached}")


def command(args) -> int:
    source = Path(args.path)
    run_dir = Path(args.run)
    manifest = read_manifest(activations_dir(run_dir))
    sae, cfg = read_sae(source)
    check_fits_cache(cfg, manifest, source)
    name = args.name or re.sub(r"[^A-Za-z0-9_.-]", "_", source.resolve().name)
    target = sae_dir(run_dir, name)
    if is_finished(target) and not args.force:
        raise SaeStoreError(f"{run_dir} already has an SAE named {name!r}: pass --name or --force")
    meta = dict(cfg.get("meta") or {})
    meta.setdefault("hook_layer", manifest.provenance["hook"]["layer"])
    meta.setdefault("hook_name", manifest.provenance["hook"]["name"])
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
