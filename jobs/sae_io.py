"""Map SAE artifacts (SAELens-layout cfg.json + tensors) to and from pipeline SAEs.

Writes the SAELens v6 fields so SAELens can load saescope's SAEs, and reads
SAELens v5/v6 folders: architectures standard (ReLU), topk, jumprelu and
batchtopk (as JumpReLU), ``apply_b_dec_to_input=False`` and
``rescale_acts_by_decoder_norm`` are folded into saescope's convention.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.sae import (
    Sae,
    SaeConfig,
    fold_b_dec_into_b_enc,
    fold_decoder_norms,
    sae_from_tensors,
    sae_tensors,
)
from storage.sae_store import SaeStoreError, load_sae_files, save_sae

SAELENS_ARCHITECTURES = {
    "standard": "relu",
    "relu": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
}
HOOK_LAYER = re.compile(r"blocks\.(\d+)\.hook_resid_post")


def sae_cfg_dict(sae: Sae, meta: dict, record: dict) -> dict:
    """cfg.json for an exported (inference, raw-unit) SAE: SAELens fields + ``saescope`` record."""
    cfg = {
        "architecture": sae.cfg.architecture,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "meta": meta,
        "saescope": record,
    }
    if sae.cfg.architecture == "topk":
        cfg["k"] = sae.cfg.k
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg


def write_sae(folder: Path, sae: Sae, meta: dict, record: dict, metrics: dict | None) -> dict:
    cfg = sae_cfg_dict(sae, meta, record)
    save_sae(folder, sae_tensors(sae), cfg, metrics)
    return cfg


def _architecture(cfg: dict, tensors: dict) -> str:
    name = cfg.get("architecture", "standard")
    if name not in SAELENS_ARCHITECTURES:
        raise SaeStoreError(
            f"SAE architecture {name!r} is not supported (supported: {', '.join(SAELENS_ARCHITECTURES)})"
        )
    arch = SAELENS_ARCHITECTURES[name]
    if name == "batchtopk" and "threshold" not in tensors:
        raise SaeStoreError("a batchtopk SAE needs its learned 'threshold' to run as JumpReLU")
    return arch


def hook_layer_of(cfg: dict) -> int | None:
    """The block whose residual output the SAE reads, from meta (v6) or the top level (v5)."""
    meta = cfg.get("meta") or {}
    for source in (meta, cfg):
        if isinstance(source.get("hook_layer"), int):
            return source["hook_layer"]
        match = HOOK_LAYER.fullmatch(str(source.get("hook_name", "")))
        if match:
            return int(match.group(1))
    return None


def read_sae(folder: Path) -> tuple[Sae, dict]:
    """Load an SAE folder (saescope or SAELens) into an inference SAE taking raw activations."""
    tensors, cfg = load_sae_files(folder)
    tensors = {name: t.float() for name, t in tensors.items()}
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SaeStoreError(
            f"{folder}: normalize_activations={cfg['normalize_activations']!r} needs a scaling factor "
            "saescope cannot recover; fold it into the weights first"
        )
    arch = _architecture(cfg, tensors)
    if not cfg.get("apply_b_dec_to_input", True):
        tensors = fold_b_dec_into_b_enc(tensors)
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        tensors = fold_decoder_norms(tensors)
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        k = int(cfg.get("k", 32)) if arch == "topk" else min(32, d_sae - 1)
    except (KeyError, TypeError, ValueError) as error:
        raise SaeStoreError(f"{folder}/cfg.json lacks a valid {error} (d_in, d_sae and k must be integers)") from error
    try:
        sae = sae_from_tensors(SaeConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k), tensors)
    except ValueError as error:
        raise SaeStoreError(f"{folder}: {error}") from error
    return sae, cfg
