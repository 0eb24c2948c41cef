"""Transcoder sets on disk: ``transcoders/<name>/layer-LL/`` (one SAELens transcoder folder each) + ``set.json``.

Each layer folder holds ``sae_weights.safetensors`` and ``cfg.json`` as written by
``storage.sae_store.save_sae``. ``set.json`` is written last, once every layer is
saved: it lists the layers, the metrics with all of them replaced at once, and how
the set was trained; a set without it is unfinished (training resumes it from
``checkpoints/``).
"""

from __future__ import annotations

import json
from pathlib import Path

from storage.atomic import atomic_write_json
from storage.constants import SAE_CFG, TRANSCODER_SET, TRANSCODERS_DIR
from storage.sae_store import SaeStoreError, check_name, load_sae_files, set_repair_hint


def transcoders_dir(run_dir: Path) -> Path:
    return Path(run_dir) / TRANSCODERS_DIR


def set_dir(run_dir: Path, name: str) -> Path:
    return transcoders_dir(run_dir) / check_name(name, "transcoder set")


def layer_dir(folder: Path, layer: int) -> Path:
    return Path(folder) / f"layer-{layer:02d}"


def finished_sets(run_dir: Path) -> list[str]:
    root = transcoders_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / TRANSCODER_SET).is_file())


def write_set(folder: Path, record: dict) -> None:
    """Mark the set finished: ``record`` must list ``layers``."""
    atomic_write_json(Path(folder) / TRANSCODER_SET, record)


def read_set(folder: Path) -> dict:
    path = Path(folder) / TRANSCODER_SET
    if not path.is_file():
        raise SaeStoreError(f"{folder} is not a finished transcoder set (no {TRANSCODER_SET}): train it first")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        layers = [int(layer) for layer in record["layers"]]
    except (ValueError, KeyError, TypeError) as error:
        raise SaeStoreError(f"{path} is damaged ({error}): {set_repair_hint(folder)}") from error
    return {**record, "layers": layers}


def resolve_set(run_dir: Path, name: str | None) -> Path:
    """The folder of set ``name``, or of the run's only finished set."""
    names = finished_sets(run_dir)
    if name is not None:
        folder = transcoders_dir(run_dir) / check_name(name, "transcoder set", "--transcoders")
        if not (folder / TRANSCODER_SET).is_file():
            raise SaeStoreError(
                f"{run_dir} has no trained transcoder set {name!r} (trained: {', '.join(names) or 'none'})"
            )
        return folder
    if not names:
        raise SaeStoreError(
            f"{run_dir} has no transcoders yet: run `saescope train --run {run_dir} --transcoder --layers all` first"
        )
    if len(names) > 1:
        raise SaeStoreError(
            f"{run_dir} holds several transcoder sets ({', '.join(names)}): choose one with --transcoders"
        )
    return set_dir(run_dir, names[0])


def load_layer_files(folder: Path, layer: int) -> tuple[dict, dict]:
    """(tensors, cfg) of one layer's transcoder."""
    path = layer_dir(folder, layer)
    if not (path / SAE_CFG).is_file():
        raise SaeStoreError(f"{path} is missing: the transcoder set {folder.name!r} is incomplete")
    return load_sae_files(path)
