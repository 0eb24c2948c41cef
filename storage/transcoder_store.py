"""Transcoder sets on disk: ``transcoders/<name>/layer-LL/`` (one SAELens transcoder folder each) + ``set.json``.

Each layer folder holds ``sae_weights.safetensors`` and ``cfg.json`` as written by
``storage.sae_store.save_sae``. ``set.json`` is written last, once every layer is
saved: it lists the layers, the metrics with all of them replaced at once, and how
the set was trained; a set without it is unfinished (training resumes it from
``checkpoints/``).
A cross-layer transcoder (``set.json`` has ``"kind": "cross_layer"``) is kept in
circuit-tracer's CLT layout instead: ``config.yaml`` + ``W_enc_{i}.safetensors`` and
``W_dec_{i}.safetensors`` per layer (``pipeline.sae.cross_layer_format`` has the fields),
so circuit-tracer's ``load_clt`` reads the folder as it is.
An imported set is filled in ``.<name>.incomplete/`` and renamed into place (``publish_set``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors_bytes

from storage.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from storage.constants import SAE_CFG, TRANSCODER_SET, TRANSCODERS_DIR
from storage.sae_store import SaeStoreError, check_name, load_sae_files, set_repair_hint
from storage.transcoder_sources import CONFIG_YAML, read_clt_layers, read_config_yaml

CROSS_LAYER = "cross_layer"
"""``set.json``'s ``kind`` of a cross-layer transcoder (per-layer sets have no ``kind``)."""


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
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / TRANSCODER_SET).is_file())


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


def is_cross_layer(record: dict) -> bool:
    """Whether a ``read_set`` record is a cross-layer transcoder's."""
    return record.get("kind") == CROSS_LAYER


def load_layer_files(folder: Path, layer: int) -> tuple[dict, dict]:
    """(tensors, cfg) of one layer's transcoder."""
    path = layer_dir(folder, layer)
    if (Path(folder) / "W_enc_0.safetensors").is_file():
        raise SaeStoreError(
            f"transcoder set {Path(folder).name!r} is a cross-layer transcoder: this reads per-layer sets only "
            "(`saescope trace` reads both)"
        )
    if not (path / SAE_CFG).is_file():
        raise SaeStoreError(f"{path} is missing: the transcoder set {folder.name!r} is incomplete")
    return load_sae_files(path)


def save_clt_files(folder: Path, files: dict[str, dict[str, torch.Tensor]], config_text: str) -> None:
    """A CLT's safetensors files (name -> tensors) and its config.yaml, each written atomically."""
    for name, tensors in files.items():
        atomic_write_bytes(Path(folder) / name, save_safetensors_bytes(tensors))
    atomic_write_text(Path(folder) / CONFIG_YAML, config_text)


def load_clt_files(folder: Path) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """(each layer's tensors, config.yaml) of a cross-layer set."""
    return read_clt_layers(folder), read_config_yaml(folder)


def publish_set(run_dir: Path, name: str, fill: Callable[[Path], None]) -> Path:
    """Run ``fill(folder)`` on a fresh ``.<name>.incomplete`` folder (it writes set.json last), then move it to the
    set ``name``, replacing a set of that name: a failed fill leaves the old set whole."""
    final = set_dir(run_dir, name)
    staging = final.parent / f".{final.name}.incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    fill(staging)
    if final.exists():
        old = final.parent / f".{final.name}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old)
    else:
        staging.rename(final)
    return final
