"""`saescope import-sae`: bring a SAELens-format SAE folder into a run, to evaluate, index and steer it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from jobs.options import POSITIONAL, add_config_arguments, config_from_args, option
from jobs.run import check_fits_cache, read_sae, write_sae
from storage.sae_store import SaeStoreError, is_finished, sae_dir
from storage.shards import activations_dir, read_manifest


@dataclass(frozen=True)
class ImportConfig:
    """Options of `saescope import-sae`."""

    path: str = option(help="folder with cfg.json and sae_weights.safetensors", flag=POSITIONAL)
    run: str = option(help="run directory whose cache the SAE reads")
    name: str | None = option(None, "name inside the run (default: the folder's name)")
    force: bool = option(False, "replace an SAE of the same name")


def register(subparsers) -> None:
    parser = subparsers.add_parser("import-sae", help="add a SAELens-format SAE folder to a run")
    add_config_arguments(parser, ImportConfig)
    parser.set_defaults(handler=lambda args: command(config_from_args(ImportConfig, args)))


def command(args: ImportConfig) -> int:
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
