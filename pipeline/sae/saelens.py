"""The SAELens layout, pure: tensor names, cfg.json fields and their conventions <-> saescope's ``Sae``.

saescope writes SAELens v6 fields so SAELens can load its SAEs, and reads
SAELens v5/v6 folders: architectures standard (ReLU), topk, jumprelu, and
batchtopk and matryoshka_batchtopk (as JumpReLU); ``apply_b_dec_to_input=False`` and
``rescale_acts_by_decoder_norm`` are folded into saescope's convention.
A Matryoshka SAE is saved as SAELens saves one for inference, ``architecture:
"jumprelu"`` with the global threshold on every latent, plus its prefix sizes in
SAELens' training field ``matryoshka_widths``; saescope's ``matryoshka`` is SAELens'
``matryoshka_batchtopk`` (``SAELENS_NAMES``).
No file I/O here: ``storage.sae_store`` reads and writes the files, and a bad
artifact is a ``ValueError`` that the caller names the folder in.

Shape legend: D d_in, F latents.
"""

from __future__ import annotations

import torch

from pipeline.lm.hook_points import HookPoint
from pipeline.sae.model import Sae, SaeConfig

SAELENS_ARCHITECTURES = {
    "standard": "relu",
    "relu": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
}
"""SAELens architecture name -> the saescope architecture that runs it."""
SAELENS_NAMES = {"matryoshka": "matryoshka_batchtopk"}
"""saescope architecture -> SAELens' name, recorded as ``trained_architecture`` (others keep their own)."""
WIDTHS_FIELD = "matryoshka_widths"


def sae_tensors(sae: Sae) -> dict[str, torch.Tensor]:
    """Weights under SAELens names: W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D] (+ threshold [F])."""
    tensors = {name: getattr(sae, name).detach() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.cfg.architecture in ("jumprelu", "batchtopk", "matryoshka"):
        tensors["threshold"] = sae.threshold.detach().float()
    return {name: tensor.contiguous() for name, tensor in tensors.items()}


def sae_from_tensors(cfg: SaeConfig, tensors: dict[str, torch.Tensor]) -> Sae:
    """Build an SAE from SAELens-named tensors, checking every shape."""
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if cfg.architecture == "jumprelu":
        expected["threshold"] = (cfg.d_sae,)
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"SAE weights lack {name!r} (have {sorted(tensors)})")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"SAE weight {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    sae = Sae(cfg)
    with torch.no_grad():
        sae.W_enc_FD.copy_(tensors["W_enc"].float().t())
        for name in ("b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(tensors[name].float())
        if cfg.architecture == "jumprelu":
            sae.log_threshold.copy_(torch.log(tensors["threshold"].float()))
        if cfg.architecture in ("batchtopk", "matryoshka"):
            sae.batch_threshold.copy_(tensors["threshold"].float().mean())
    return sae.eval()


def fold_decoder_norms(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unit-norm decoder rows: scale latent i's encoder column, bias and threshold by ||W_dec[i]||.

    f_i * W_dec[i] is unchanged for ReLU and JumpReLU codes. For TopK it changes which
    latents are selected (they are ranked by pre_i * ||W_dec[i]||), which is exactly
    what SAELens TopK SAEs saved with ``rescale_acts_by_decoder_norm`` do.
    """
    norms_F = tensors["W_dec"].norm(dim=1).clamp_min(1e-12)
    folded = dict(tensors)
    folded["W_dec"] = tensors["W_dec"] / norms_F[:, None]
    folded["W_enc"] = tensors["W_enc"] * norms_F[None, :]
    folded["b_enc"] = tensors["b_enc"] * norms_F
    if "threshold" in tensors:
        folded["threshold"] = tensors["threshold"] * norms_F
    return folded


def fold_b_dec_into_b_enc(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For SAEs that do not subtract b_dec at the input: b_enc' = b_enc + b_dec @ W_enc.

    Then (x - b_dec) @ W_enc + b_enc' equals x @ W_enc + b_enc, saescope's convention.
    """
    folded = dict(tensors)
    folded["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ tensors["W_enc"]
    return folded


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
    if sae.cfg.matryoshka_widths:
        cfg[WIDTHS_FIELD] = list(sae.cfg.matryoshka_widths)
    return cfg


def saelens_name(architecture: str) -> str:
    """SAELens' name for a saescope architecture (matryoshka -> matryoshka_batchtopk)."""
    return SAELENS_NAMES.get(architecture, architecture)


def _hook_sources(cfg: dict) -> tuple[dict, dict]:
    return (cfg.get("meta") or {}), cfg


def _named_point(source: dict) -> HookPoint | None:
    try:
        return HookPoint.from_name(str(source.get("hook_name", "")))
    except ValueError:
        return None


def sae_hook_point(cfg: dict) -> HookPoint | None:
    """The hook point the SAE reads, from ``hook_name`` in meta (v6) or the top level (v5); None if unknown."""
    for source in _hook_sources(cfg):
        point = _named_point(source)
        if point is not None:
            return point
    return None


def hook_layer_of(cfg: dict) -> int | None:
    """The block whose hook point the SAE reads, from meta (v6) or the top level (v5)."""
    for source in _hook_sources(cfg):
        if isinstance(source.get("hook_layer"), int):
            return source["hook_layer"]
        point = _named_point(source)
        if point is not None:
            return point.layer
    return None


def _architecture(cfg: dict, tensors: dict) -> str:
    name = cfg.get("architecture", "standard")
    if name not in SAELENS_ARCHITECTURES:
        raise ValueError(f"SAE architecture {name!r} is not supported (supported: {', '.join(SAELENS_ARCHITECTURES)})")
    if name in ("batchtopk", "matryoshka_batchtopk") and "threshold" not in tensors:
        raise ValueError(f"a {name} SAE needs its learned 'threshold' to run as JumpReLU")
    return SAELENS_ARCHITECTURES[name]


def sae_from_saelens(tensors: dict[str, torch.Tensor], cfg: dict) -> Sae:
    """An inference SAE taking raw activations from SAELens-layout tensors and cfg.json (ValueError if unusable)."""
    tensors = {name: t.float() for name, t in tensors.items()}
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(
            f"normalize_activations={cfg['normalize_activations']!r} needs a scaling factor "
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
        raise ValueError(f"cfg.json lacks a valid {error} (d_in, d_sae and k must be integers)") from error
    shape = SaeConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k, matryoshka_widths=_widths(cfg, arch))
    return sae_from_tensors(shape, tensors)


def _widths(cfg: dict, arch: str) -> tuple[int, ...]:
    """The saved ``matryoshka_widths`` (a JumpReLU SAE keeps them for per-prefix metrics), else ()."""
    widths = cfg.get(WIDTHS_FIELD) or []
    if not isinstance(widths, list) or (widths and arch != "jumprelu"):
        raise ValueError(f"{WIDTHS_FIELD} = {widths!r} needs a list of ints and a matryoshka (JumpReLU) SAE")
    return tuple(widths)
