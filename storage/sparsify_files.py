"""EleutherAI sparsify folders on disk: ``<hookpoint>/cfg.json`` + ``<hookpoint>/sae.safetensors``.

A path is either one coder's folder (named by its hook point, e.g. ``layers.15.mlp``)
or a folder holding several such folders (what sparsify's trainer saves per run).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load as load_safetensors_bytes

from storage.errors import first_line
from storage.sae_store import SaeStoreError

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"


def is_coder(folder: Path) -> bool:
    return (Path(folder) / SPARSIFY_CFG).is_file() and (Path(folder) / SPARSIFY_WEIGHTS).is_file()


def is_sparsify(path: Path) -> bool:
    """Whether ``path`` is a sparsify coder folder or a folder of them."""
    path = Path(path)
    return is_coder(path) or (path.is_dir() and any(is_coder(child) for child in path.iterdir()))


def coder_folders(path: Path) -> dict[str, Path]:
    """Hook point name -> coder folder, for one coder or a folder of them."""
    path = Path(path)
    if is_coder(path):
        return {path.resolve().name: path}
    return {child.name: child for child in sorted(path.iterdir()) if is_coder(child)}


def load_coder(folder: Path) -> tuple[dict, dict]:
    """(tensors, cfg) of one sparsify coder folder, or a SaeStoreError naming the file."""
    cfg_path, weights = Path(folder) / SPARSIFY_CFG, Path(folder) / SPARSIFY_WEIGHTS
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        raise SaeStoreError(f"{cfg_path} is damaged ({error})") from error
    try:
        tensors = load_safetensors_bytes(weights.read_bytes())
    except Exception as error:  # safetensors raises its own error types
        raise SaeStoreError(f"{weights} is damaged ({first_line(error)})") from error
    return tensors, cfg
