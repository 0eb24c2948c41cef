"""Transcoder sets made by other tools, on disk or on the Hugging Face Hub: their files, read into tensors and dicts.

Layouts (``source_layout`` tells them apart):
  * ``circuit-tracer``: a folder with ``config.yaml``. ``model_kind: transcoder_set`` lists one file
    per layer under ``transcoders`` (paths relative to the folder, absolute, or ``hf://owner/repo/file``;
    each a ``.safetensors`` or Gemma Scope ``.npz``), or leaves the list out and holds
    ``layer_{i}.safetensors``; ``model_kind: cross_layer_transcoder`` holds ``W_enc_{i}.safetensors``
    and ``W_dec_{i}.safetensors`` for every layer i.
  * ``saelens``: a folder of transcoder folders (or one), each SAELens' ``cfg.json`` +
    ``sae_weights.safetensors`` or Gemma Scope's ``params.npz`` / ``params.safetensors``
    (+ ``config.json``), found at any depth (Gemma Scope nests ``layer_L/width_W/average_l0_N/``).
``hf://owner/repo[/sub]`` names a Hub folder: it is downloaded through huggingface_hub (its
cache) and read like a local one; offline, it is refused before anything is fetched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load as load_safetensors_bytes

from storage.constants import SAE_CFG, SAE_WEIGHTS
from storage.errors import first_line
from storage.sae_store import SaeStoreError

CONFIG_YAML = "config.yaml"
GEMMA_SCOPE_WEIGHTS = ("params.npz", "params.safetensors")
GEMMA_SCOPE_CFG = "config.json"
HF_PREFIX = "hf://"


def is_hub(spec: str) -> bool:
    return str(spec).startswith(HF_PREFIX)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_parts(spec: str) -> tuple[str, str | None, str | None]:
    """(repo id, path inside it or None, revision or None) of ``hf://owner/repo[/path][@revision]``."""
    body, _, revision = spec[len(HF_PREFIX) :].partition("@")
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2 or any(p in (".", "..") for p in parts):
        raise SaeStoreError(f"{spec!r} is not a Hub path: write hf://owner/repo or hf://owner/repo/folder")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None


def _refuse_offline(spec: str) -> None:
    if _offline():
        raise SaeStoreError(
            f"{spec} is on the Hugging Face Hub but HF_HUB_OFFLINE is set: download it on a machine with the "
            "network (huggingface-cli download) and import the local folder"
        )


def local_folder(spec: str) -> Path:
    """The folder ``spec`` names: a local path as is, or ``hf://owner/repo[/sub]`` downloaded (its sub folder)."""
    if not is_hub(spec):
        return Path(spec)
    repo, sub, revision = _hub_parts(spec)
    _refuse_offline(spec)
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(repo, revision=revision, allow_patterns=[f"{sub}/**"] if sub else None)
    except Exception as error:  # huggingface_hub raises many error types
        raise SaeStoreError(f"{spec} could not be downloaded ({first_line(error)})") from error
    return Path(root) / sub if sub else Path(root)


def _hub_file(spec: str) -> Path:
    repo, path, revision = _hub_parts(spec.split("?", 1)[0])
    if path is None:
        raise SaeStoreError(f"{spec!r} names a repository, not a file: write hf://owner/repo/path/file")
    if "revision=" in spec:
        revision = spec.split("revision=", 1)[1].split("&", 1)[0]
    _refuse_offline(spec)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, path, revision=revision))
    except Exception as error:  # huggingface_hub raises many error types
        raise SaeStoreError(f"{spec} could not be downloaded ({first_line(error)})") from error


def source_layout(folder: Path) -> str | None:
    """``circuit-tracer``, ``saelens`` (a transcoder folder or a folder of them), or None."""
    folder = Path(folder)
    if (folder / CONFIG_YAML).is_file():
        return "circuit-tracer"
    if transcoder_folders(folder):
        return "saelens"
    return None


def read_config_yaml(folder: Path) -> dict:
    path = Path(folder) / CONFIG_YAML
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SaeStoreError(f"{path} is damaged ({first_line(error)})") from error
    if not isinstance(config, dict):
        raise SaeStoreError(f"{path} is damaged (not a mapping of fields)")
    return config


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.npz`` file (SaeStoreError naming a missing or damaged file)."""
    path = Path(path)
    if not path.is_file():
        raise SaeStoreError(f"{path} is missing")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                return {name: torch.from_numpy(np.array(arrays[name])) for name in arrays.files}
        return load_safetensors_bytes(path.read_bytes())
    except Exception as error:  # numpy and safetensors raise their own error types
        raise SaeStoreError(f"{path} is damaged ({first_line(error)})") from error


def _entry_path(entry, folder: Path) -> str:
    """One ``transcoders`` entry: a path string, or (older configs) a mapping with ``filepath``."""
    if isinstance(entry, dict):
        entry = entry.get("filepath")
    if not isinstance(entry, str) or not entry:
        raise SaeStoreError(f"{Path(folder) / CONFIG_YAML}: every `transcoders` entry needs a file path, got {entry!r}")
    return entry


def set_layer_files(folder: Path, config: dict) -> list[Path]:
    """A circuit-tracer ``transcoder_set``'s file of each layer, in layer order (Hub files downloaded)."""
    folder = Path(folder)
    entries = config.get("transcoders")
    if entries is None:
        count = len(list(folder.glob("layer_*.safetensors")))
        return [folder / f"layer_{i}.safetensors" for i in range(count)]
    if not isinstance(entries, list):
        raise SaeStoreError(f"{folder / CONFIG_YAML}: `transcoders` must be a list of file paths")
    if entries and all(isinstance(e, dict) and isinstance(e.get("layer"), int) for e in entries):
        entries = sorted(entries, key=lambda e: e["layer"])
    paths = [_entry_path(entry, folder) for entry in entries]
    return [_hub_file(p) if is_hub(p) else (folder / p if not Path(p).is_absolute() else Path(p)) for p in paths]


def read_clt_layers(folder: Path) -> list[dict[str, torch.Tensor]]:
    """A circuit-tracer CLT's tensors per layer (its W_enc_{i} and W_dec_{i} files merged), i = 0..L-1."""
    folder = Path(folder)
    count = len(list(folder.glob("W_enc_*.safetensors")))
    if count == 0:
        raise SaeStoreError(f"{folder} holds no W_enc_{{i}}.safetensors: not a circuit-tracer cross-layer transcoder")
    return [
        {**read_weights(folder / f"W_enc_{i}.safetensors"), **read_weights(folder / f"W_dec_{i}.safetensors")}
        for i in range(count)
    ]


def _is_transcoder_folder(folder: Path) -> bool:
    if (folder / SAE_CFG).is_file() and (folder / SAE_WEIGHTS).is_file():
        return True
    return any((folder / name).is_file() for name in GEMMA_SCOPE_WEIGHTS)


def transcoder_folders(path: Path) -> list[Path]:
    """``path`` if it is one SAELens / Gemma Scope transcoder folder, else every such folder below it."""
    path = Path(path)
    if not path.is_dir():
        return []
    if _is_transcoder_folder(path):
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_dir() and _is_transcoder_folder(p))


def read_transcoder_folder(folder: Path, weights: bool = True) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(tensors, cfg, layout) of one folder: layout ``saelens`` (cfg.json) or ``gemma-scope`` (params.*).

    ``weights=False`` reads the cfg only (tensors ``{}``)."""
    folder = Path(folder)
    if (folder / SAE_CFG).is_file() and (folder / SAE_WEIGHTS).is_file():
        return (read_weights(folder / SAE_WEIGHTS) if weights else {}), _read_json(folder / SAE_CFG), "saelens"
    path = next(folder / name for name in GEMMA_SCOPE_WEIGHTS if (folder / name).is_file())
    cfg = _read_json(folder / GEMMA_SCOPE_CFG) if (folder / GEMMA_SCOPE_CFG).is_file() else {}
    return (read_weights(path) if weights else {}), cfg, "gemma-scope"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise SaeStoreError(f"{path} is damaged ({first_line(error)})") from error
    if not isinstance(value, dict):
        raise SaeStoreError(f"{path} is damaged (not a JSON object)")
    return value
