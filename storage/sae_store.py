"""SAE artifacts on disk: ``saes/<name>/sae_weights.safetensors`` + ``cfg.json`` (SAELens layout).

Weights are named ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in],
``b_dec`` [d_in] and, for JumpReLU, ``threshold`` [d_sae]. ``cfg.json`` carries the
SAELens fields at the top level (architecture, d_in, d_sae, k, dtype, ...; a
Matryoshka SAE, saved as jumprelu, adds ``matryoshka_widths``), the
SAELens ``meta`` block, and saescope's own record under the key ``saescope``
(SAELens ignores unknown top-level keys). An SAE counts as finished once both
files exist; ``cfg.json`` is written last, each file atomically.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from storage.atomic import atomic_write_bytes, atomic_write_json
from storage.constants import SAE_CFG, SAE_METRICS, SAE_WEIGHTS, SAES_DIR, TRANSCODER_SET, TRANSCODERS_DIR
from storage.errors import first_line


class SaeStoreError(ValueError):
    """An SAE folder is missing, ambiguous or unreadable."""


def saes_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SAES_DIR


NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""A safe folder name on every file system: letters, digits, '_', '-', '.' (not first)."""
NAME_MAX = 100
"""Longest name accepted (file systems allow 255 bytes; the name also prefixes temp and grid member names)."""


def check_name(name: str, what: str = "SAE", flag: str = "--name") -> str:
    """A name usable as one folder inside the run, or a SaeStoreError naming the option and what is allowed.

    The one check of every verb's name of something it writes (SAEs, transcoder sets, graphs).
    """
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise SaeStoreError(
            f"{flag} {name!r} is not a valid {what} name: use letters, digits, '_', '-' and '.' (not first), "
            "with no spaces, slashes or line breaks"
        )
    if len(name) > NAME_MAX:
        raise SaeStoreError(f"{flag} is {len(name)} characters long: a {what} name may have at most {NAME_MAX}")
    return name


def sae_dir(run_dir: Path, name: str) -> Path:
    return saes_dir(run_dir) / check_name(name)


def is_finished(folder: Path) -> bool:
    return (Path(folder) / SAE_WEIGHTS).is_file() and (Path(folder) / SAE_CFG).is_file()


def finished_sae_names(run_dir: Path) -> list[str]:
    """SAEs whose cfg.json (written last) exists; a missing weights file is reported when one is loaded."""
    root = saes_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / SAE_CFG).is_file())


def resolve_sae(run_dir: Path, name: str | None) -> Path:
    """The folder of SAE ``name``, or of the run's only SAE when name is None."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise SaeStoreError(f"run folder {run_dir} does not exist: check --run")
    if not run_dir.is_dir():
        raise SaeStoreError(f"--run {run_dir} is a file, not a run folder")
    names = finished_sae_names(run_dir)
    if name is not None:
        folder = saes_dir(run_dir) / check_name(name, flag="--sae")
        if not (folder / SAE_CFG).is_file():
            known = ", ".join(names) or "none"
            raise SaeStoreError(f"{run_dir} has no trained SAE named {name!r} (trained: {known})")
        return folder
    if not names:
        raise SaeStoreError(f"{run_dir} has no trained SAE yet: run `saescope train --run {run_dir}` first")
    if len(names) > 1:
        raise SaeStoreError(f"{run_dir} holds several SAEs ({', '.join(names)}): choose one with --sae NAME")
    return sae_dir(run_dir, names[0])


def save_sae(folder: Path, tensors: dict[str, torch.Tensor], cfg: dict, metrics: dict | None = None) -> None:
    """Write weights, then metrics, then cfg.json (which marks the SAE finished).

    Replacing an SAE, its old cfg.json goes first, once the new weights are serialized: a writer
    killed half-way leaves an unfinished SAE, never new weights under an old cfg.json.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = save_safetensors_bytes({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    (folder / SAE_CFG).unlink(missing_ok=True)
    atomic_write_bytes(folder / SAE_WEIGHTS, data)
    if metrics is not None:
        atomic_write_json(folder / SAE_METRICS, metrics)
    atomic_write_json(folder / SAE_CFG, cfg)


def repair_hint(folder: Path) -> str:
    """What to run when the SAE files in ``folder`` are damaged: a command for a run's SAE or transcoder layer,
    else (an import source) a note that the folder itself must be fixed."""
    folder = Path(folder)
    if folder.parent.name == SAES_DIR:
        run = folder.parent.parent
        return f"retrain with `saescope train --run {run} --name {folder.name} --force`, or import it again"
    if folder.parent.parent.name == TRANSCODERS_DIR and folder.name.startswith("layer-"):
        return set_repair_hint(folder.parent)
    return "this folder is not an SAE of a run: fix it or download it again, then import it"


def set_repair_hint(set_folder: Path) -> str:
    """The command that replaces a damaged transcoder set (its layers from set.json when readable)."""
    set_folder = Path(set_folder)
    layers = ""
    try:
        listed = json.loads((set_folder / TRANSCODER_SET).read_text(encoding="utf-8"))["layers"]
        layers = " --layers " + ",".join(str(int(layer)) for layer in listed)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return (
        f"retrain the set with `saescope train --run {set_folder.parent.parent} --transcoder "
        f"--name {set_folder.name}{layers} --force`"
    )


def load_sae_files(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, cfg dict) of an SAE folder in SAELens layout."""
    folder = Path(folder)
    weights, cfg_path = folder / SAE_WEIGHTS, folder / SAE_CFG
    if cfg_path.is_file() and not weights.is_file():
        raise SaeStoreError(f"{weights} is missing (deleted?): {repair_hint(folder)}")
    if not weights.is_file() or not cfg_path.is_file():
        raise SaeStoreError(f"{folder} is not an SAE folder: it needs {SAE_WEIGHTS} and {SAE_CFG}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as error:
        raise SaeStoreError(f"{cfg_path} is damaged ({error}): {repair_hint(folder)}") from error
    try:
        tensors = load_safetensors_bytes(weights.read_bytes())
    except Exception as error:  # safetensors raises its own error types
        raise SaeStoreError(f"{weights} is damaged ({first_line(error)}): {repair_hint(folder)}") from error
    return tensors, cfg


def update_cfg(folder: Path, update: dict) -> dict:
    """Merge ``update`` into the ``saescope`` record of cfg.json (e.g. new metrics)."""
    path = Path(folder) / SAE_CFG
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.setdefault("saescope", {}).update(update)
    atomic_write_json(path, cfg)
    return cfg


def weights_fingerprint(folder: Path) -> str:
    """sha256 of the SAE's weights file (memoized per path, size and modification time)."""
    path = Path(folder) / SAE_WEIGHTS
    if not path.is_file():
        raise SaeStoreError(f"{path} is missing: {repair_hint(Path(folder))}")
    stat = path.stat()
    return _sha256_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_of(path: str, _size: int, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def read_sae_cfg(folder: Path) -> dict:
    """cfg.json of an SAE folder alone (no weights), or {} when it is missing or damaged."""
    try:
        cfg = json.loads((Path(folder) / SAE_CFG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


@dataclass(frozen=True)
class SaeRecord:
    """Typed view of an SAE's cfg.json: SAELens fields plus saescope's own record (empty parts when absent)."""

    cfg: dict

    @classmethod
    def read(cls, folder: Path) -> SaeRecord:
        return cls(read_sae_cfg(folder))

    @property
    def saescope(self) -> dict:
        record = self.cfg.get("saescope")
        return record if isinstance(record, dict) else {}

    @property
    def meta(self) -> dict:
        meta = self.cfg.get("meta")
        return meta if isinstance(meta, dict) else {}

    @property
    def training(self) -> dict:
        """How it was trained (tokens, batch size, lr, dtype, seed, held-out contexts); {} when imported."""
        return self.saescope.get("training") or {}

    @property
    def metrics(self) -> dict:
        """Final metrics from training, else the last `saescope eval`'s, else {}."""
        return self.saescope.get("metrics") or self.saescope.get("last_eval") or {}

    @property
    def training_metrics(self) -> dict:
        """The metrics recorded at the end of training alone ({} for an imported SAE)."""
        return self.saescope.get("metrics") or {}

    @property
    def trained_architecture(self) -> str:
        """What was trained (batchtopk and matryoshka_batchtopk are saved as jumprelu), else the saved architecture."""
        return str(self.saescope.get("trained_architecture") or self.cfg.get("architecture", "?"))
