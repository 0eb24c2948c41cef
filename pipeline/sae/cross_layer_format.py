"""circuit-tracer's cross-layer transcoder layout, pure: ``CrossLayerTranscoder`` <-> its files' tensors, config.yaml.

Shape legend: L layers, D d_model, F latents per layer.

circuit-tracer loads a CLT from a folder holding ``config.yaml`` (``model_kind:
cross_layer_transcoder``, ``feature_input_hook``, ``feature_output_hook``) and two files per
layer i = 0..L-1 (``load_clt``, ``CrossLayerTranscoder.to_safetensors``):

    W_enc_{i}.safetensors   W_enc_{i} [F, D], b_enc_{i} [F], b_dec_{i} [D], threshold_{i} [F] (JumpReLU sets)
    W_dec_{i}.safetensors   W_dec_{i} [F, L - i, D]: source layer i's writes into output layers i..L-1

    pre_i = x_i @ W_enc_i^T + b_enc_i,   f_i = JumpReLU(pre_i; threshold_i), or ReLU without thresholds
    y_j   = b_dec_j + sum over i <= j of f_i @ W_dec_i[:, j - i]

which is saescope's ``CrossLayerTranscoder`` with ``W_dec[i]`` = ``W_dec_{i}`` flattened.
circuit-tracer's CLT has no TopK and its files hold no skip path; saescope adds both as fields
circuit-tracer does not read: ``activation: topk`` and ``k`` in config.yaml (circuit-tracer
would run such a set as ReLU), and ``W_skip_{i}`` [D_in, D_out] in the encoder file, in
circuit-tracer's CLT orientation (y_i += x_i @ W_skip_i; saescope holds [D_out, D_in]).
No file I/O here; bad input is a ValueError.
"""

from __future__ import annotations

import torch

from pipeline.sae.circuit_tracer_format import INPUT_HOOK, OUTPUT_HOOK
from pipeline.sae.cross_layer import CltConfig, CrossLayerTranscoder

MODEL_KIND = "cross_layer_transcoder"


def encoder_file(layer: int) -> str:
    return f"W_enc_{layer}.safetensors"


def decoder_file(layer: int) -> str:
    return f"W_dec_{layer}.safetensors"


def clt_file_tensors(clt: CrossLayerTranscoder) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> its tensors (float32, contiguous), two files per layer."""
    files = {}
    for i in range(clt.cfg.n_layers):
        enc = {f"W_enc_{i}": clt.W_enc[i], f"b_enc_{i}": clt.b_enc_LF[i], f"b_dec_{i}": clt.b_dec_LD[i]}
        if clt.cfg.architecture == "jumprelu":
            enc[f"threshold_{i}"] = clt.threshold(i)
        if clt.cfg.skip:
            enc[f"W_skip_{i}"] = clt.W_skip[i].t()
        files[encoder_file(i)] = enc
        files[decoder_file(i)] = {f"W_dec_{i}": clt.decoder(i)}
    return {name: {k: t.detach().float().contiguous() for k, t in tensors.items()} for name, tensors in files.items()}


def clt_config(clt: CrossLayerTranscoder, model_name: str, scan_name: str) -> dict:
    """config.yaml's fields for ``clt`` (saved beside its files, which circuit-tracer finds by name)."""
    arch = clt.cfg.architecture
    if arch not in ("topk", "relu", "jumprelu"):
        raise ValueError(f"a {arch} CLT has no circuit-tracer layout: export it first (BatchTopK becomes JumpReLU)")
    config = {
        "model_kind": MODEL_KIND,
        "model_name": model_name,
        "scan_name": scan_name,
        "feature_input_hook": INPUT_HOOK,
        "feature_output_hook": OUTPUT_HOOK,
    }
    if arch == "topk":
        config.update(activation="topk", k=clt.cfg.k)
    return config


def _layer_tensor(tensors: dict, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in tensors:
        raise ValueError(f"the cross-layer transcoder's files lack {name!r}")
    tensor = tensors[name]
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor.float()


def _positive_log(threshold_F: torch.Tensor, layer: int) -> torch.Tensor:
    if bool((threshold_F < 0).any()):
        raise ValueError(f"threshold_{layer} has negative values: JumpReLU thresholds are >= 0")
    return threshold_F.log()


def clt_shape(layers: list[dict[str, torch.Tensor]]) -> tuple[int, int, int]:
    """(L, D, F) from the first encoder, checking every layer has one width (ValueError naming the layers)."""
    if not layers or "W_enc_0" not in layers[0]:
        raise ValueError("a cross-layer transcoder needs W_enc_0 (files W_enc_{i} / W_dec_{i} for i = 0..L-1)")
    widths = {i: tuple(t[f"W_enc_{i}"].shape) for i, t in enumerate(layers) if f"W_enc_{i}" in t}
    if len(set(widths.values())) > 1:
        shown = ", ".join(f"layer {i}: {shape[0]} x {shape[1]}" for i, shape in widths.items())
        raise ValueError(f"the layers' encoders have different shapes ({shown}): a CLT has one width")
    d_sae, d_model = widths[0]
    return len(layers), d_model, d_sae


def clt_from_circuit_tracer(layers: list[dict[str, torch.Tensor]], config: dict) -> CrossLayerTranscoder:
    """A CLT from each layer's tensors (its two files merged, layer i at index i) and config.yaml's fields."""
    L, D, Fl = clt_shape(layers)
    has_threshold = [f"threshold_{i}" in t for i, t in enumerate(layers)]
    if any(has_threshold) and not all(has_threshold):
        raise ValueError("some layers have JumpReLU thresholds and some do not: a CLT has one activation")
    activation = config.get("activation") or ("jumprelu" if all(has_threshold) else "relu")
    if activation not in ("topk", "relu", "jumprelu"):
        raise ValueError(f"CLT activation {activation!r} is not supported (topk, relu, jumprelu)")
    k = int(config["k"]) if activation == "topk" and "k" in config else min(32, max(1, Fl - 1))
    skip = [f"W_skip_{i}" in t for i, t in enumerate(layers)]
    if any(skip) and not all(skip):
        raise ValueError("some layers have a skip path (W_skip_{i}) and some do not")
    clt = CrossLayerTranscoder(CltConfig(L, D, Fl, activation, k, skip=all(skip)))
    with torch.no_grad():
        for i, tensors in enumerate(layers):
            clt.W_enc[i].copy_(_layer_tensor(tensors, f"W_enc_{i}", (Fl, D)))
            clt.b_enc_LF[i].copy_(_layer_tensor(tensors, f"b_enc_{i}", (Fl,)))
            clt.b_dec_LD[i].copy_(_layer_tensor(tensors, f"b_dec_{i}", (D,)))
            clt.decoder(i).copy_(_layer_tensor(tensors, f"W_dec_{i}", (Fl, L - i, D)))
            if activation == "jumprelu":
                clt.log_threshold_LF[i].copy_(_positive_log(_layer_tensor(tensors, f"threshold_{i}", (Fl,)), i))
            if clt.cfg.skip:
                clt.W_skip[i].copy_(_layer_tensor(tensors, f"W_skip_{i}", (D, D)).t())
    return clt.eval()
