"""circuit-tracer's transcoder-set layout, pure: ``Transcoder`` <-> its per-layer tensors and ``config.yaml`` fields.

Shape legend: D d_model, F latents.

circuit-tracer (0.5) loads a set of per-layer transcoders from a folder holding
``config.yaml`` and one ``layer_{i}.safetensors`` per layer i = 0..n-1:

    W_enc  [F, D]   pre = x @ W_enc^T + b_enc        (saescope keeps W_enc as [D, F])
    b_enc  [F]
    W_dec  [F, D]   y = f @ W_dec + b_dec + x @ W_skip^T
    b_dec  [D]
    W_skip [D, D]   optional
    activation_function.threshold [F]   JumpReLU sets only

``config.yaml`` has ``model_kind: transcoder_set``, ``feature_input_hook:
mlp.hook_in`` (its hook on the MLP's input, after the norm: saescope's ``mlp-in``),
``feature_output_hook: hook_mlp_out``, ``scan_name`` (``scan`` in 0.5.0) and, for
TopK sets, ``activation: topk`` with ``k`` (ReLU sets: ``activation: relu``; JumpReLU
sets leave ``activation`` out and circuit-tracer reads the thresholds). circuit-tracer
0.5.0 (PyPI) reads no ``activation``: it loads JumpReLU and ReLU sets as they are, but
would read a TopK set as ReLU; its main branch reads ``activation: topk``. One
difference of semantics: circuit-tracer's TopK keeps the k largest pre-activations
as they are, saescope's then applies ReLU, so the two agree wherever those k are positive.
No file I/O here; bad input is a ValueError.
"""

from __future__ import annotations

import torch

from pipeline.sae.model import SaeConfig
from pipeline.sae.transcoder import Transcoder

INPUT_HOOK = "mlp.hook_in"
OUTPUT_HOOK = "hook_mlp_out"
THRESHOLD = "activation_function.threshold"
MLP_INPUT_HOOKS = (INPUT_HOOK, "ln2.hook_normalized")
"""``feature_input_hook`` values that name the MLP's normalized input (saescope's mlp-in)."""
MLP_OUTPUT_HOOKS = (OUTPUT_HOOK, "mlp.hook_out")
"""``feature_output_hook`` values that name the MLP's output (saescope's mlp-out)."""


def check_mlp_hooks(config: dict) -> None:
    """ValueError unless config.yaml's hooks are the MLP's normalized input and its output, which saescope traces."""
    hook_in, hook_out = config.get("feature_input_hook"), config.get("feature_output_hook")
    if hook_in not in MLP_INPUT_HOOKS:
        why = " (the residual stream before the MLP's norm)" if hook_in == "hook_resid_mid" else ""
        raise ValueError(
            f"feature_input_hook {hook_in!r}{why} is not the MLP's normalized input "
            f"({' or '.join(MLP_INPUT_HOOKS)}), the only input saescope's tracer replaces"
        )
    if hook_out not in MLP_OUTPUT_HOOKS:
        raise ValueError(f"feature_output_hook {hook_out!r} is not the MLP's output ({' or '.join(MLP_OUTPUT_HOOKS)})")


def layer_file(layer: int) -> str:
    return f"layer_{layer}.safetensors"


def circuit_tracer_tensors(tc: Transcoder) -> dict[str, torch.Tensor]:
    """One layer's weights under circuit-tracer's names and shapes (float32, contiguous)."""
    tensors = {"W_enc": tc.W_enc_FD, "b_enc": tc.b_enc, "W_dec": tc.W_dec, "b_dec": tc.b_dec}
    if tc.W_skip is not None:
        tensors["W_skip"] = tc.W_skip
    if tc.cfg.architecture == "jumprelu":
        tensors[THRESHOLD] = tc.log_threshold.exp()
    return {name: tensor.detach().float().contiguous() for name, tensor in tensors.items()}


def circuit_tracer_config(tcs: dict[int, Transcoder], model_name: str, scan_name: str, files: list[str]) -> dict:
    """config.yaml's fields for a set of every layer 0..n-1 (``files``: each layer's path, in layer order)."""
    if sorted(tcs) != list(range(len(tcs))):
        raise ValueError(f"circuit-tracer needs a transcoder at every layer from 0; this set has {sorted(tcs)}")
    archs = {tc.cfg.architecture for tc in tcs.values()}
    if len(archs) != 1:
        raise ValueError(f"the layers use different activations ({', '.join(sorted(archs))}); circuit-tracer needs one")
    (arch,) = archs
    config = {
        "model_kind": "transcoder_set",
        "model_name": model_name,
        "scan_name": scan_name,
        "scan": scan_name,
        "feature_input_hook": INPUT_HOOK,
        "feature_output_hook": OUTPUT_HOOK,
    }
    if arch == "topk":
        ks = {tc.cfg.k for tc in tcs.values()}
        if len(ks) != 1:
            raise ValueError(f"the layers use different k ({sorted(ks)}); circuit-tracer takes one k per set")
        config.update(activation="topk", k=ks.pop())
    elif arch == "relu":
        config["activation"] = "relu"
    elif arch != "jumprelu":
        raise ValueError(f"activation {arch!r} has no circuit-tracer counterpart (topk, relu, jumprelu)")
    return {**config, "transcoders": list(files)}


def _topk_k(tensors: dict, config: dict) -> int:
    """k of a TopK set: config.yaml's ``k``, else the ``k`` tensor circuit-tracer's ``to_safetensors`` saves."""
    if config.get("k") is not None:
        return int(config["k"])
    if "k" in tensors:
        return int(tensors["k"].reshape(-1)[0])
    raise ValueError("a TopK set needs its k: config.yaml has no `k` and the layer file no `k` tensor")


def transcoder_from_circuit_tracer(tensors: dict[str, torch.Tensor], config: dict) -> Transcoder:
    """An inference transcoder from one ``layer_{i}.safetensors`` and the set's config.yaml fields."""
    weight = tensors.get("W_enc")
    if weight is None or weight.ndim != 2:
        raise ValueError(f"circuit-tracer layer file lacks a 2-d 'W_enc' [F, D] (has {sorted(tensors)})")
    d_sae, d_model = weight.shape
    activation = config.get("activation") or ("jumprelu" if THRESHOLD in tensors else "relu")
    if activation not in ("topk", "relu", "jumprelu"):
        raise ValueError(f"activation {activation!r} is not supported (topk, relu, jumprelu)")
    expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_model), "b_dec": (d_model,)}
    if "W_skip" in tensors:
        expected["W_skip"] = (d_model, d_model)
    if activation == "jumprelu":
        expected[THRESHOLD] = (d_sae,)
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"circuit-tracer layer file lacks {name!r} (has {sorted(tensors)})")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}")
    if activation == "jumprelu" and bool((tensors[THRESHOLD] < 0).any()):
        raise ValueError("the JumpReLU thresholds have negative values: they must be >= 0")
    k = _topk_k(tensors, config) if activation == "topk" else min(32, d_sae - 1)
    tc = Transcoder(SaeConfig(d_model, d_sae, activation, k), skip="W_skip" in tensors)
    with torch.no_grad():
        tc.W_enc_FD.copy_(tensors["W_enc"].float())
        tc.b_enc.copy_(tensors["b_enc"].float())
        tc.W_dec.copy_(tensors["W_dec"].float())
        tc.b_dec.copy_(tensors["b_dec"].float())
        if tc.W_skip is not None:
            tc.W_skip.copy_(tensors["W_skip"].float())
        if activation == "jumprelu":
            tc.log_threshold.copy_(tensors[THRESHOLD].float().log())
    return tc.eval()
