"""Transcoder files, pure: SAELens-layout tensors and cfg.json fields, and sparsify's layout, <-> ``Transcoder``.

saescope writes each layer's transcoder as an SAELens transcoder folder:
``W_enc`` [D, F], ``b_enc`` [F], ``W_dec`` [F, D], ``b_dec`` [D], ``W_skip`` [D, D]
(output = f @ W_dec + b_dec + x @ W_skip^T) and ``threshold`` [F] for JumpReLU;
cfg.json has ``d_in``, ``d_sae``, ``d_out``, ``apply_b_dec_to_input: false``, the
activation (``activation_fn``, and ``k`` for topk) and in ``meta`` the input and
output hooks (``hook_name`` = ``blocks.L.ln2.hook_normalized``, ``hook_name_out`` =
``blocks.L.hook_mlp_out``). ``architecture`` is SAELens' name where SAELens has the
class: ``jumprelu_skip_transcoder`` (a BatchTopK transcoder after export),
``skip_transcoder`` (ReLU); SAELens has no TopK transcoder, so a TopK one is
``topk_skip_transcoder``, which SAELens refuses rather than misreads as ReLU.
Also read: Gemma Scope's JumpReLU transcoders (``transcoder_from_gemma_scope``) and the
layer a transcoder folder reads (``transcoder_layer``: from cfg.json, else its path).
No file I/O here; bad input is a ValueError.
"""

from __future__ import annotations

import re

import torch

from pipeline.lm.hook_points import HookPoint
from pipeline.sae.model import SaeConfig
from pipeline.sae.transcoder import Transcoder


def transcoder_tensors(tc: Transcoder) -> dict[str, torch.Tensor]:
    """Weights under SAELens names (see the module docstring)."""
    tensors = {name: getattr(tc, name).detach() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if tc.W_skip is not None:
        tensors["W_skip"] = tc.W_skip.detach()
    if tc.cfg.architecture == "jumprelu":
        tensors["threshold"] = tc.threshold.detach().float()
    return {name: tensor.float().contiguous() for name, tensor in tensors.items()}


def transcoder_cfg_dict(tc: Transcoder, layer: int, meta: dict, record: dict) -> dict:
    """cfg.json of one layer's exported transcoder (SAELens fields + ``saescope`` record)."""
    arch = tc.cfg.architecture
    prefix = {"jumprelu": "jumprelu_", "topk": "topk_"}.get(arch, "")
    cfg = {
        "architecture": prefix + ("skip_transcoder" if tc.W_skip is not None else "transcoder"),
        "activation_fn": arch,
        "d_in": tc.cfg.d_in,
        "d_sae": tc.cfg.d_sae,
        "d_out": tc.cfg.d_in,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "meta": {
            **meta,
            "hook_name": HookPoint(layer, "mlp-in").name,
            "hook_layer": layer,
            "hook_name_out": HookPoint(layer, "mlp-out").name,
            "hook_layer_out": layer,
        },
        "saescope": record,
    }
    if arch == "topk":
        cfg["k"] = tc.cfg.k
    return cfg


def _shaped(tensors: dict, expected: dict) -> None:
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"transcoder weights lack {name!r} (have {sorted(tensors)})")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"transcoder weight {name} has shape {tuple(tensors[name].shape)}, expected {shape}")


def _build(cfg: SaeConfig, W_enc_FD, b_enc, W_dec, b_dec, W_skip, threshold) -> Transcoder:
    tc = Transcoder(cfg, skip=W_skip is not None)
    with torch.no_grad():
        tc.W_enc_FD.copy_(W_enc_FD.float())
        tc.b_enc.copy_(b_enc.float())
        tc.W_dec.copy_(W_dec.float())
        tc.b_dec.copy_(b_dec.float())
        if W_skip is not None:
            tc.W_skip.copy_(W_skip.float())
        if threshold is not None:
            tc.log_threshold.copy_(torch.log(threshold.float()))
    return tc.eval()


def _activation_of(architecture: str) -> str:
    for prefix in ("jumprelu", "topk"):
        if architecture.startswith(prefix + "_"):
            return prefix
    return "relu"


def transcoder_from_saelens(tensors: dict[str, torch.Tensor], cfg: dict) -> Transcoder:
    """An inference transcoder from an SAELens-layout transcoder folder's tensors and cfg.json."""
    try:
        d_in, d_sae, d_out = int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg.get("d_out", cfg["d_in"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"cfg.json lacks a valid {error} (d_in and d_sae must be integers)") from error
    if d_out != d_in:
        raise ValueError(f"transcoders from d_in={d_in} to d_out={d_out} are not supported (MLP in and out match)")
    arch = cfg.get("activation_fn") or _activation_of(str(cfg.get("architecture", "")))
    if arch not in ("topk", "jumprelu", "relu"):
        raise ValueError(f"transcoder activation {arch!r} is not supported (topk, jumprelu, relu)")
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if "W_skip" in tensors:
        expected["W_skip"] = (d_in, d_in)
    if arch == "jumprelu":
        expected["threshold"] = (d_sae,)
    _shaped(tensors, expected)
    k = int(cfg.get("k", 32)) if arch == "topk" else min(32, d_sae - 1)
    shape = SaeConfig(d_in, d_sae, arch, k)
    return _build(
        shape,
        tensors["W_enc"].t(),
        tensors["b_enc"],
        tensors["W_dec"],
        tensors["b_dec"],
        tensors.get("W_skip"),
        tensors.get("threshold"),
    )


GEMMA_SCOPE_NAMES = {"w_enc": "W_enc", "w_dec": "W_dec", "affine_skip_connection": "W_skip_in_out"}
"""Gemma Scope 2's lower-case names -> Gemma Scope 1's (``params.npz``); its skip is [D_in, D_out]."""


def transcoder_from_gemma_scope(tensors: dict[str, torch.Tensor]) -> Transcoder:
    """A JumpReLU transcoder from Gemma Scope's ``params.npz`` / ``params.safetensors`` tensors.

    ``W_enc`` [D, F], ``W_dec`` [F, D], ``b_enc`` [F], ``b_dec`` [D], ``threshold`` [F]
    (Gemma Scope 2: ``w_enc``, ``w_dec`` and an optional ``affine_skip_connection`` [D_in, D_out],
    y += x @ A, which is saescope's W_skip = A^T). pre = x @ W_enc + b_enc: nothing is subtracted
    from the input.
    """
    named = {GEMMA_SCOPE_NAMES.get(name, name): t.float() for name, t in tensors.items()}
    weight = named.get("W_enc")
    if weight is None or weight.ndim != 2:
        raise ValueError(f"Gemma Scope weights lack a 2-d 'W_enc' [D, F] (have {sorted(tensors)})")
    d_in, d_sae = weight.shape
    expected = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    if "W_skip_in_out" in named:
        expected["W_skip_in_out"] = (d_in, d_in)
    _shaped(named, expected)
    if bool((named["threshold"] < 0).any()):
        raise ValueError("the JumpReLU thresholds have negative values: they must be >= 0")
    skip = named.get("W_skip_in_out")
    shape = SaeConfig(d_in, d_sae, "jumprelu", min(32, d_sae - 1))
    return _build(shape, weight.t(), named["b_enc"], named["W_dec"], named["b_dec"],
                  None if skip is None else skip.t(), named["threshold"])  # fmt: skip


LAYER_IN_NAME = re.compile(r"(?:^|[^a-z])layers?[._-]?(\d+)(?:$|[^0-9])")
"""``layer_12``, ``layer-12``, ``layers.12`` in a hook name or a folder name."""


def transcoder_layer(cfg: dict, parts: tuple[str, ...]) -> int | None:
    """The layer a transcoder folder reads: cfg.json's ``meta.hook_layer`` / ``hook_layer``, its hook name
    (``blocks.L.``, Gemma Scope 2's ``hf_hook_point_in``), else the last ``layer_L`` in the folder's path ``parts``."""
    for source in (cfg.get("meta") or {}, cfg):
        if isinstance(source.get("hook_layer"), int):
            return source["hook_layer"]
    for name in ((cfg.get("meta") or {}).get("hook_name"), cfg.get("hook_name"), cfg.get("hf_hook_point_in")):
        match = re.search(r"(?:blocks|layers)\.(\d+)\.", str(name or ""))
        if match:
            return int(match.group(1))
    for part in reversed(parts):
        match = LAYER_IN_NAME.search(part.lower())
        if match:
            return int(match.group(1))
    return None
