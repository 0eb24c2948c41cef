"""What most verbs start with: a run's cache manifest, its SAE folder, the SAE, the checked model, the index.

``open_run`` replaces the preamble every verb used to repeat (read the manifest,
resolve the SAE, load the model the cache was made with and check its revision).
Reading and writing SAE artifacts joins ``storage.sae_store`` (the files) and
``pipeline.sae.saelens`` (the layout); a bad artifact becomes a ``SaeStoreError``
naming its folder.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from pipeline.lm.hook_points import HookPoint
from pipeline.lm.models import LoadedModel, load_model
from pipeline.sae.model import Sae
from pipeline.sae.saelens import hook_layer_of, sae_cfg_dict, sae_from_saelens, sae_hook_point, sae_tensors
from storage.constants import SAE_CFG, SAE_WEIGHTS
from storage.explanations import ExplanationReader, open_explanations
from storage.home import converted_models_dir
from storage.index_queries import FeatureIndex, open_sae_index
from storage.sae_store import (
    SaeStoreError,
    load_sae_files,
    read_sae_cfg,
    repair_hint,
    resolve_sae,
    save_sae,
    weights_fingerprint,
)
from storage.shards import CacheManifest, activations_dir, read_manifest


def write_sae(folder: Path, sae: Sae, meta: dict, record: dict, metrics: dict | None) -> dict:
    """Save an exported SAE in the SAELens layout with saescope's record; returns its cfg.json."""
    cfg = sae_cfg_dict(sae, meta, record)
    save_sae(folder, sae_tensors(sae), cfg, metrics)
    return cfg


CFG_TYPES = {
    "d_in": int,
    "d_sae": int,
    "k": (int, type(None)),
    "architecture": str,
    "dtype": str,
    "hook_name": str,
    "hook_layer": int,
    "apply_b_dec_to_input": bool,
    "rescale_acts_by_decoder_norm": bool,
    "normalize_activations": (str, type(None)),
    "matryoshka_widths": list,
    "meta": dict,
    "saescope": dict,
}
"""cfg.json keys every reader relies on and their JSON types (each checked when present)."""
META_TYPES = {"hook_name": str, "hook_layer": int, "context_size": int, "model_name": str}


def _type_problem(table: dict, types: dict, where: str) -> str | None:
    for key, kind in types.items():
        if key not in table:
            continue
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            return f"{where}{key} is {value!r}, not {names}"
    return None


def check_sae_cfg(cfg: dict, folder: Path) -> None:
    """A SaeStoreError naming cfg.json when a field has the wrong type (``"d_in": "32"``, a string hook_layer)."""
    problem = _type_problem(cfg, CFG_TYPES, "") or _type_problem(cfg.get("meta") or {}, META_TYPES, "meta.")
    if problem is not None:
        raise SaeStoreError(f"{Path(folder) / SAE_CFG} is damaged ({problem}): {repair_hint(folder)}")


def check_finite(tensors: dict[str, torch.Tensor], weights: Path) -> None:
    """A SaeStoreError naming the weights file when a tensor holds NaN or infinity (they give FVU nan and L0 0)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise SaeStoreError(
                f"{weights} is damaged: {name} holds {bad} NaN or infinite value(s): {repair_hint(weights.parent)}"
            )


def read_sae(folder: Path) -> tuple[Sae, dict]:
    """Load an SAE folder (saescope or SAELens) into an inference SAE taking raw activations.

    The cfg.json fields' types and the weights' finiteness are checked (one pass over the weights).
    """
    tensors, cfg = load_sae_files(folder)
    check_sae_cfg(cfg, folder)
    check_finite(tensors, Path(folder) / SAE_WEIGHTS)
    try:
        return sae_from_saelens(tensors, cfg), cfg
    except ValueError as error:
        raise SaeStoreError(f"{Path(folder) / SAE_CFG}: {error}") from error


def cache_hook_point(manifest: CacheManifest) -> HookPoint:
    """The hook point the cache's activations were read at (resid-post for caches made before kinds)."""
    return HookPoint(manifest.layer, manifest.hook_kind)


def at_point(manifest: CacheManifest, point: HookPoint | None) -> CacheManifest:
    """The cache reading ``point`` when it holds several points (a one-point cache as it is: callers check it)."""
    if point is None or len(manifest.hook_points) == 1:
        return manifest
    return manifest.select(point.layer, point.kind)


def as_read_by(manifest: CacheManifest, sae_cfg: dict) -> CacheManifest:
    """The cache as the SAE with this cfg.json reads it: in a cache of several points, the SAE's own is selected."""
    return at_point(manifest, sae_hook_point(sae_cfg))


def check_reads_point(folder: Path, manifest: CacheManifest) -> None:
    """A finished SAE that a train job would skip must read the point the job was asked for."""
    point = sae_hook_point(read_sae_cfg(folder))
    if point is not None and point != cache_hook_point(manifest):
        raise SaeStoreError(
            f"SAE {folder.name!r} in {folder.parent.parent} reads {point.name}, not {manifest.hook_name}: "
            "pass --name to train another SAE on this point (or --force to replace it)"
        )


def load_run_model(manifest: CacheManifest, device: torch.device | str) -> LoadedModel:
    """The model that produced the cache, checked against the cache's recorded revision."""
    return load_model(
        manifest.model_spec, device=device, convert_dir=converted_models_dir(), expect_revision=manifest.model_revision
    )


def check_fits_cache(cfg: dict, manifest: CacheManifest, source: Path) -> None:
    """The SAE must read activations of the cache's width and hook."""
    if int(cfg["d_in"]) != manifest.d_model:
        raise SaeStoreError(f"{source} reads d_in={cfg['d_in']} but the cache holds d_model={manifest.d_model}")
    layer, cached = hook_layer_of(cfg), cache_hook_point(manifest)
    if layer is not None and layer != cached.layer:
        raise SaeStoreError(f"{source} was trained on layer {layer} but the cache holds layer {cached.layer}")
    point = sae_hook_point(cfg)
    if point is not None and point != cached:
        raise SaeStoreError(f"{source} reads {point.name} but the cache holds {cached.name}")


class Run:
    """An opened run: its folder, its cache manifest (read when first needed) and one SAE folder (or None)."""

    def __init__(self, folder: Path, sae_folder: Path | None):
        self.folder, self.sae_folder = folder, sae_folder

    @cached_property
    def manifest(self) -> CacheManifest:
        """The cache, at the opened SAE's hook point when it holds several."""
        manifest = read_manifest(activations_dir(self.folder))
        return manifest if self.sae_folder is None else as_read_by(manifest, read_sae_cfg(self.sae_folder))

    def checked(self) -> Run:
        """This run once its manifest has been read (a missing or damaged cache is one clear error now)."""
        _ = self.manifest
        return self

    @property
    def layer(self) -> int:
        return self.manifest.layer

    @property
    def hook_point(self) -> HookPoint:
        """Where in the model the cache (and every SAE trained on it) reads."""
        return cache_hook_point(self.manifest)

    def _sae_folder(self) -> Path:
        if self.sae_folder is None:
            raise ValueError(f"{self.folder} was opened without an SAE")
        return self.sae_folder

    def sae(self) -> tuple[Sae, dict]:
        """The SAE (inference, raw units) and its cfg.json."""
        return read_sae(self._sae_folder())

    def model(self, device: torch.device | str) -> LoadedModel:
        """The model the cache was made with, its revision checked."""
        return load_run_model(self.manifest, device)

    def index(self) -> FeatureIndex:
        """The SAE's feature index (refused when stale or missing, with the command that builds it)."""
        return open_sae_index(self._sae_folder())

    def labels(self) -> ExplanationReader | None:
        """The SAE's explanations, or None when `saescope explain` has not run on these weights."""
        folder = self._sae_folder()
        return open_explanations(folder, weights_fingerprint(folder))


def open_run(run: str | Path, sae: str | None = None, with_sae: bool = True) -> Run:
    """The run and, with ``with_sae``, the SAE named ``sae`` (default: the run's only one), checked to exist."""
    folder = Path(run)
    return Run(folder, resolve_sae(folder, sae) if with_sae else None)


def saelens_meta(manifest: CacheManifest) -> dict:
    """SAELens' ``meta`` block of cfg.json for an SAE trained on this cache (hook_name: its point's TL name)."""
    prov = manifest.provenance
    return {
        "model_name": prov["model"]["name"],
        "hook_name": cache_hook_point(manifest).name,
        "hook_layer": manifest.layer,
        "context_size": manifest.ctx_len,
        "prepend_bos": True,
        "exclude_special_tokens": list(manifest.special_token_ids),
        "dataset_path": prov["corpus"]["description"],
    }
