"""EleutherAI sparsify's layout, pure: one coder's ``cfg.json`` + ``sae.safetensors`` tensors -> Sae or Transcoder.

sparsify saves one folder per hook point, named by the module it hooked:
``layers.L`` (the residual stream after block L: an SAE) or ``layers.L.mlp`` (a
transcoder when ``transcode`` is true: it reads the MLP module's input, which is
saescope's mlp-in, and reconstructs its output, mlp-out). ``cfg.json`` holds
``d_in``, ``k``, ``activation`` (topk), ``transcode``, ``skip_connection`` and
more; the tensors are ``encoder.weight`` [F, D], ``encoder.bias`` [F],
``W_dec`` [F, D], ``b_dec`` [D] and, with a skip connection, ``W_skip`` [D, D].
An SAE's encoder reads ``x - b_dec``, a transcoder's reads ``x``; the output is
``topk(relu(pre)) @ W_dec + b_dec (+ x @ W_skip^T)``. No file I/O here.
"""

from __future__ import annotations

import re

import torch

from pipeline.lm.hook_points import HookPoint
from pipeline.sae.model import Sae, SaeConfig
from pipeline.sae.transcoder import Transcoder

HOOKPOINT = re.compile(r"(?:.*\.)?layers\.(\d+)(\.mlp)?")


def hook_point_of(hookpoint: str, transcode: bool) -> HookPoint:
    """saescope's hook point that a sparsify coder reads (the mlp-in of a transcoder)."""
    match = HOOKPOINT.fullmatch(hookpoint)
    if not match or bool(match.group(2)) != transcode:
        wanted = "layers.L.mlp (a transcoder)" if transcode else "layers.L (the residual stream after block L)"
        raise ValueError(f"sparsify hook point {hookpoint!r} is not supported here: expected {wanted}")
    return HookPoint(int(match.group(1)), "mlp-in" if transcode else "resid-post")


def _shape(tensors: dict, cfg: dict) -> SaeConfig:
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"sparsify activation {cfg.get('activation')!r} is not supported (only topk)")
    try:
        d_in, k = int(cfg["d_in"]), int(cfg["k"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"sparsify cfg.json lacks a valid {error} (d_in and k must be integers)") from error
    weight = tensors.get("encoder.weight")
    if weight is None:
        raise ValueError(f"sparsify weights lack 'encoder.weight' (have {sorted(tensors)})")
    d_sae = int(weight.shape[0])
    expected = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if cfg.get("skip_connection", False):
        expected["W_skip"] = (d_in, d_in)
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"sparsify weights lack {name!r} (have {sorted(tensors)})")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"sparsify weight {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    return SaeConfig(d_in, d_sae, "topk", k)


def coder_from_sparsify(tensors: dict[str, torch.Tensor], cfg: dict) -> Sae:
    """An inference Sae (``transcode: false``) or Transcoder (``transcode: true``) from one sparsify folder."""
    shape = _shape(tensors, cfg)
    transcode = bool(cfg.get("transcode", False))
    if not transcode and cfg.get("skip_connection", False):
        raise ValueError("sparsify SAEs with a skip connection are not supported (only transcoders have one)")
    coder = Transcoder(shape, skip="W_skip" in tensors) if transcode else Sae(shape)
    with torch.no_grad():
        coder.W_enc_FD.copy_(tensors["encoder.weight"].float())
        coder.b_enc.copy_(tensors["encoder.bias"].float())
        coder.W_dec.copy_(tensors["W_dec"].float())
        coder.b_dec.copy_(tensors["b_dec"].float())
        if transcode and "W_skip" in tensors:
            coder.W_skip.copy_(tensors["W_skip"].float())
    return coder.eval()
