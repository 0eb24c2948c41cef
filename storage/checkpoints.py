"""Training checkpoints: any tree of dicts/lists/tensors/scalars, as safetensors + JSON, never pickle.

A checkpoint is a folder ``checkpoints/step-000120/`` holding ``state.safetensors``
(every tensor of the tree, keyed by its path) and ``state.json`` (the rest of the
tree, with tensors replaced by references). It is written as
``step-000120.incomplete-<pid>/`` and renamed into place, so a killed job never
leaves a half checkpoint that looks finished. The newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from storage.atomic import atomic_write_bytes, atomic_write_text
from storage.constants import CHECKPOINT_META, CHECKPOINT_TENSORS, FORMAT_VERSION

PREFIX = "step-"
TENSOR_REF = "__tensor__"
DICT_ITEMS = "__dict_items__"


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not match the run."""


def _flatten(node, path: str, tensors: dict):
    if isinstance(node, torch.Tensor):
        tensors[path] = node.detach().to("cpu").contiguous()
        return {TENSOR_REF: path}
    if isinstance(node, dict):
        items = [[key, _flatten(value, f"{path}.{key}", tensors)] for key, value in node.items()]
        if all(isinstance(key, str) for key, _ in items):
            return dict(items)
        return {DICT_ITEMS: items}
    if isinstance(node, (list, tuple)):
        return [_flatten(value, f"{path}.{i}", tensors) for i, value in enumerate(node)]
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise CheckpointError(f"cannot checkpoint {type(node).__name__} at {path}")


def _unflatten(node, tensors: dict):
    if isinstance(node, dict):
        if TENSOR_REF in node:
            return tensors[node[TENSOR_REF]]
        if DICT_ITEMS in node:
            return {key: _unflatten(value, tensors) for key, value in node[DICT_ITEMS]}
        return {key: _unflatten(value, tensors) for key, value in node.items()}
    if isinstance(node, list):
        return [_unflatten(value, tensors) for value in node]
    return node


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:09d}"


def list_checkpoints(folder: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def save_checkpoint(folder: Path, step: int, tree: dict, keep: int = 2) -> Path:
    """Atomically publish ``tree`` as the checkpoint of ``step``; prune older ones."""
    folder = Path(folder)
    final = folder / checkpoint_name(step)
    staging = folder / f"{final.name}.incomplete-{os.getpid()}"
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(tree, "state", tensors)
    try:
        staging.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(staging / CHECKPOINT_TENSORS, save_safetensors_bytes(tensors))
        meta = {"format_version": FORMAT_VERSION, "step": step, "tree": skeleton}
        atomic_write_text(staging / CHECKPOINT_META, json.dumps(meta))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict:
    """The tree saved in one checkpoint folder."""
    path = Path(path)
    try:
        meta = json.loads((path / CHECKPOINT_META).read_text(encoding="utf-8"))
        tensors = load_safetensors_bytes((path / CHECKPOINT_TENSORS).read_bytes())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} is unreadable: {error}") from error
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('format_version')}")
    return _unflatten(meta["tree"], tensors)


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def remove_incomplete(folder: Path) -> None:
    """Delete staging folders that killed jobs left behind."""
    folder = Path(folder)
    if folder.is_dir():
        for stale in folder.glob(f"{PREFIX}*.incomplete-*"):
            shutil.rmtree(stale, ignore_errors=True)
