"""The local replacement model of one prompt: the real model, linear in its residual stream.

Shape legend: B batch (rows of targets), T positions, D d_model, F latents, H heads, V vocabulary.

``record_prompt`` runs the real model once on one prompt (no padding) and keeps, per
block: the residual entering it, the attention pattern of every head, the 1/rms
factors of ``input_layernorm`` and ``post_attention_layernorm``, the MLP's input
(``mlp-in``) and output (``mlp-out``); and the final norm's 1/rms factor and the logits.

``replacement_forward`` then recomputes the model with everything that is not linear
in the residual stream frozen at its recorded value:

  * RMSNorm(x) = w * x * s(x) with s = 1/sqrt(mean(x^2) + eps) frozen per position;
    plus a frozen ``norm_fix`` = recorded output - w * x * s, which is zero in exact
    arithmetic and absorbs the float32 rounding HF's RMSNorm does in every dtype
    (~1e-7 relative), so that completeness holds to float64 precision;
  * attention: the softmax pattern (so rotary, queries and keys) is frozen; only the
    value path, V and O projections, stays linear: ``o_proj(P @ v_proj(norm(x)))``.
    The pattern is computed in ``record_prompt`` from the block's own q/k projections,
    the rotary (cos, sin) the model hands its attention module, ``scaling`` and a causal
    mask, rather than read from the attention implementation (sdpa returns none);
    the completeness test is what shows it is the pattern the model used;
  * each MLP is replaced by its transcoder: features with activations frozen at their
    prompt values (constants written as ``acts @ W_dec``), the decoder bias, the linear
    skip ``W_skip`` of the (linearized) MLP input, and a frozen error
    ``mlp_out - transcoder(mlp_in)`` per layer and position.

Per-layer transcoders and a cross-layer transcoder (``pipeline.sae.cross_layer``) share
one interface: ``Replacement.output_layers(l)`` and ``decoder_rows(l)`` say where the
features of source layer l write (layer l alone; or l..L-1, the rows concatenated), and
``feature_writes(l')`` sums the writes of every source into output layer l'. A CLT's
features are frozen per layer like a transcoder's; the output of MLP l' is replaced by
``b_dec[l'] + skip + sum_{l <= l'} acts_l @ W_dec[l][:, l' - l]`` plus its frozen error
``mlp_out[l'] - that``, so completeness holds the same way.

The result is affine in the embeddings and in whatever is written after each MLP;
with every feature and error written, its logits equal the model's own.

Supported: HF Llama-style decoders (``input_layernorm``, ``post_attention_layernorm``,
``self_attn.{q,k,v,o}_proj``, rotate-half rotary, causal attention without a sliding
window or q/k norms); anything else raises a ValueError naming what is missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.lm.hook_points import attention_module, mlp_module
from pipeline.lm.hooks import decoder_blocks
from pipeline.sae.cross_layer import CltLayer, CrossLayerTranscoder


@dataclass(frozen=True)
class LayerRecord:
    """What one block computed on the prompt (batch dimension dropped)."""

    resid_pre_TD: torch.Tensor
    """The residual stream entering the block."""
    pattern_HTT: torch.Tensor
    """Attention pattern per head, query x key."""
    scale_in_T1: torch.Tensor
    """1/rms of ``resid_pre`` (input_layernorm)."""
    fix_in_TD: torch.Tensor
    """input_layernorm output minus w * x * s (rounding of HF's float32 norm)."""
    resid_mid_TD: torch.Tensor
    """The residual stream after attention (input of post_attention_layernorm)."""
    scale_post_T1: torch.Tensor
    """1/rms of ``resid_mid`` (post_attention_layernorm)."""
    fix_post_TD: torch.Tensor
    """post_attention_layernorm output minus w * x * s."""
    mlp_in_TD: torch.Tensor
    """The MLP's input (``mlp-in``)."""
    mlp_out_TD: torch.Tensor
    """The MLP's output (``mlp-out``)."""


@dataclass(frozen=True)
class PromptRecord:
    """One forward of the real model on one prompt."""

    ids_T: torch.Tensor
    embed_TD: torch.Tensor
    layers: tuple[LayerRecord, ...]
    resid_final_TD: torch.Tensor
    """The residual stream after the last block (input of the final norm)."""
    scale_final_T1: torch.Tensor
    fix_final_TD: torch.Tensor
    logits_TV: torch.Tensor


@dataclass(frozen=True)
class Replacement:
    """The prompt's record plus each layer's transcoder codes and error."""

    record: PromptRecord
    transcoders: tuple[nn.Module, ...]
    """Per layer, a transcoder or the ``CltLayer`` view of a cross-layer transcoder."""
    acts: tuple[torch.Tensor, ...]
    """Per layer, dense feature activations [T, F] at the prompt."""
    errors: tuple[torch.Tensor, ...]
    """Per layer, mlp_out - transcoder(mlp_in) [T, D]."""

    def output_layers(self, source: int) -> range:
        """The MLP outputs that the features of layer ``source`` write into."""
        tc = self.transcoders[source]
        return tc.output_layers if isinstance(tc, CltLayer) else range(source, source + 1)

    def decoder_rows(self, source: int) -> torch.Tensor:
        """[F, n_out * D]: each feature's writes into ``output_layers(source)``, concatenated."""
        tc = self.transcoders[source]
        return tc.decoder_rows if isinstance(tc, CltLayer) else tc.W_dec

    def feature_writes(self, layer: int) -> torch.Tensor:
        """What the active features of every source write into MLP output ``layer`` [T, D] (no bias)."""
        D = self.record.embed_TD.shape[1]
        total_TD = self.record.embed_TD.new_zeros(self.record.embed_TD.shape)
        for source in range(layer + 1):
            outputs = self.output_layers(source)
            if layer in outputs:
                j = layer - outputs.start
                W_FD = _as(self.decoder_rows(source)[:, j * D : (j + 1) * D], self.acts[source])
                total_TD = total_TD + self.acts[source] @ W_FD
        return total_TD


def _as(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return weight.to(dtype=like.dtype, device=like.device)


def _eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise ValueError(f"cannot find the epsilon of {type(norm).__name__}")


def _rms_scale(norm: nn.Module, x_TD: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(x_TD.pow(2).mean(-1, keepdim=True) + _eps(norm))


def _norm_child(block: nn.Module, name: str) -> nn.Module:
    norm = getattr(block, name, None)
    if not isinstance(norm, nn.Module) or not hasattr(norm, "weight"):
        raise ValueError(f"{type(block).__name__} has no {name}: only Llama-style blocks can be traced")
    return norm


def _check_attention(attn: nn.Module, config) -> None:
    missing = [p for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling") if not hasattr(attn, p)]
    if missing:
        raise ValueError(f"{type(attn).__name__} lacks {', '.join(missing)}: only Llama-style attention can be traced")
    if hasattr(attn, "q_norm") or getattr(config, "sliding_window", None):
        raise ValueError(f"{type(attn).__name__} uses q/k norms or a sliding window, which tracing does not model")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_pattern(attn: nn.Module, h_TD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Causal softmax pattern [H, T, T] of a Llama attention module on its (normed) input."""
    T, hd = h_TD.shape[0], attn.head_dim
    q_HTd = attn.q_proj(h_TD).view(T, -1, hd).transpose(0, 1)
    k_HTd = attn.k_proj(h_TD).view(T, -1, hd).transpose(0, 1)
    cos, sin = (c.reshape(T, hd).to(h_TD.dtype) for c in cos_sin)
    q_HTd, k_HTd = q_HTd * cos + _rotate_half(q_HTd) * sin, k_HTd * cos + _rotate_half(k_HTd) * sin
    k_HTd = k_HTd.repeat_interleave(q_HTd.shape[0] // k_HTd.shape[0], dim=0)
    scores_HTT = q_HTd @ k_HTd.transpose(1, 2) * attn.scaling
    future = torch.ones(T, T, dtype=torch.bool, device=h_TD.device).triu(1)
    return scores_HTT.masked_fill(future, float("-inf")).softmax(-1)


def _layer_record(block: nn.Module, seen: dict, config) -> LayerRecord:
    attn = attention_module(block)
    _check_attention(attn, config)
    norm_in = _norm_child(block, "input_layernorm")
    norm_post = _norm_child(block, "post_attention_layernorm")
    x, mid = seen["resid_pre"], seen["resid_pre"] + seen["attn_out"]
    s_in, s_post = _rms_scale(norm_in, x), _rms_scale(norm_post, mid)
    return LayerRecord(
        resid_pre_TD=x,
        pattern_HTT=attention_pattern(attn, seen["attn_in"], seen["cos_sin"]),
        scale_in_T1=s_in,
        fix_in_TD=seen["attn_in"] - _as(norm_in.weight, x) * (x * s_in),
        resid_mid_TD=mid,
        scale_post_T1=s_post,
        fix_post_TD=seen["mlp_in"] - _as(norm_post.weight, mid) * (mid * s_post),
        mlp_in_TD=seen["mlp_in"],
        mlp_out_TD=seen["mlp_out"],
    )


def _hooks(stack: ExitStack, block: nn.Module, seen: dict) -> None:
    def block_pre(_m, args, kwargs):
        seen["resid_pre"] = (args[0] if args else kwargs["hidden_states"])[0]

    def attn_pre(_m, args, kwargs):
        seen["attn_in"] = (args[0] if args else kwargs["hidden_states"])[0]
        seen["cos_sin"] = kwargs["position_embeddings"]

    def store(key):
        return lambda _m, _i, out: seen.__setitem__(key, (out[0] if isinstance(out, tuple) else out)[0])

    attn, mlp = attention_module(block), mlp_module(block)
    stack.callback(block.register_forward_pre_hook(block_pre, with_kwargs=True).remove)
    stack.callback(attn.register_forward_pre_hook(attn_pre, with_kwargs=True).remove)
    stack.callback(attn.register_forward_hook(store("attn_out")).remove)
    stack.callback(mlp.register_forward_pre_hook(lambda _m, inputs: seen.__setitem__("mlp_in", inputs[0][0])).remove)
    stack.callback(mlp.register_forward_hook(store("mlp_out")).remove)


@torch.no_grad()
def record_prompt(model: nn.Module, ids_T: torch.Tensor) -> PromptRecord:
    """Run the model once on one unpadded prompt [T] and keep what the replacement model freezes."""
    if ids_T.ndim != 1 or ids_T.numel() == 0:
        raise ValueError(f"record_prompt takes one prompt as a 1-d tensor of token ids, got shape {tuple(ids_T.shape)}")
    blocks = decoder_blocks(model)
    seen: list[dict] = [{} for _ in blocks]
    final: dict = {}
    with ExitStack() as stack:
        for block, store in zip(blocks, seen, strict=True):
            _hooks(stack, block, store)
        final_norm = model.base_model.norm
        stack.callback(final_norm.register_forward_hook(lambda _m, i, o: final.update(x=i[0][0], y=o[0])).remove)
        logits_TV = model(input_ids=ids_T[None], use_cache=False).logits[0]
    layers = tuple(_layer_record(block, store, model.config) for block, store in zip(blocks, seen, strict=True))
    s_final = _rms_scale(final_norm, final["x"])
    return PromptRecord(
        ids_T=ids_T,
        embed_TD=layers[0].resid_pre_TD,
        layers=layers,
        resid_final_TD=final["x"],
        scale_final_T1=s_final,
        fix_final_TD=final["y"] - _as(final_norm.weight, final["x"]) * (final["x"] * s_final),
        logits_TV=logits_TV,
    )


def _per_layer(n_layers: int, transcoders) -> list:
    if isinstance(transcoders, CrossLayerTranscoder):
        if transcoders.cfg.n_layers != n_layers:
            raise ValueError(
                f"the cross-layer transcoder spans {transcoders.cfg.n_layers} layers, the model has {n_layers}"
            )
        return [transcoders.layer_view(layer) for layer in range(n_layers)]
    if isinstance(transcoders, Mapping):
        return [transcoders[layer] for layer in range(n_layers)]
    return list(transcoders)


@torch.no_grad()
def build_replacement(
    record: PromptRecord, transcoders: Mapping[int, nn.Module] | Sequence[nn.Module] | CrossLayerTranscoder
) -> Replacement:
    """Attach one transcoder per layer (or one cross-layer transcoder): their codes on the prompt and the
    frozen errors."""
    n_layers = len(record.layers)
    per_layer = _per_layer(n_layers, transcoders)
    if len(per_layer) != n_layers:
        raise ValueError(f"tracing needs one transcoder per layer: the model has {n_layers}, got {len(per_layer)}")
    acts = tuple(
        tc.encode(layer.mlp_in_TD.to(tc.W_dec.dtype)).to(layer.mlp_in_TD.dtype)
        for layer, tc in zip(record.layers, per_layer, strict=True)
    )
    partial = Replacement(record, tuple(per_layer), acts, ())
    errors = []
    for out, (layer, tc) in enumerate(zip(record.layers, per_layer, strict=True)):
        x_TD = layer.mlp_in_TD
        out_TD = partial.feature_writes(out) + _as(tc.b_dec, x_TD) + _skip(tc, x_TD)
        errors.append(layer.mlp_out_TD - out_TD)
    return dataclasses.replace(partial, errors=tuple(errors))


def _skip(tc: nn.Module, x_BTD: torch.Tensor) -> torch.Tensor:
    W_skip = getattr(tc, "W_skip", None)
    return 0 * x_BTD if W_skip is None else x_BTD @ _as(W_skip, x_BTD).T


def _value_path(attn: nn.Module, h_BTD: torch.Tensor, pattern_HTT: torch.Tensor) -> torch.Tensor:
    B, T, _ = h_BTD.shape
    v_BhTd = attn.v_proj(h_BTD).view(B, T, -1, attn.head_dim).transpose(1, 2)
    v_BHTd = v_BhTd.repeat_interleave(pattern_HTT.shape[0] // v_BhTd.shape[1], dim=1)
    z_BTHd = (pattern_HTT @ v_BHTd).transpose(1, 2)
    return attn.o_proj(z_BTHd.reshape(B, T, -1))


@dataclass(frozen=True)
class LinearOutputs:
    """What the frozen linear model computed: every MLP input and, if it ran to the end, the final normed residual."""

    mlp_in: tuple[torch.Tensor, ...]
    """Per layer run [B, T, D]."""
    final_BTD: torch.Tensor | None


def replacement_forward(
    model: nn.Module,
    rep: Replacement,
    embed_BTD: torch.Tensor,
    writes: Sequence[torch.Tensor],
    last_layer: int | None = None,
) -> LinearOutputs:
    """The frozen linear model: residual = embed; per block, frozen-pattern attention, then the MLP replaced
    by ``skip(mlp_in) + b_dec + writes[L]`` (``writes[L]``: features and error written after MLP L).

    Affine in ``embed_BTD`` and ``writes``. Stops after layer ``last_layer``'s MLP input if given.
    """
    blocks = decoder_blocks(model)
    stop = len(blocks) - 1 if last_layer is None else last_layer
    x_BTD, mlp_ins = embed_BTD, []
    for layer, (block, rec, tc) in enumerate(zip(blocks, rep.record.layers, rep.transcoders, strict=True)):
        h_BTD = _as(block.input_layernorm.weight, x_BTD) * (x_BTD * rec.scale_in_T1) + rec.fix_in_TD
        x_BTD = x_BTD + _value_path(attention_module(block), h_BTD, rec.pattern_HTT)
        m_BTD = _as(block.post_attention_layernorm.weight, x_BTD) * (x_BTD * rec.scale_post_T1) + rec.fix_post_TD
        mlp_ins.append(m_BTD)
        if layer == stop and last_layer is not None:
            return LinearOutputs(tuple(mlp_ins), None)
        x_BTD = x_BTD + _skip(tc, m_BTD) + _as(tc.b_dec, m_BTD) + writes[layer]
    norm = model.base_model.norm
    final_BTD = _as(norm.weight, x_BTD) * (x_BTD * rep.record.scale_final_T1) + rep.record.fix_final_TD
    return LinearOutputs(tuple(mlp_ins), final_BTD)


def replacement_logits(model: nn.Module, rep: Replacement) -> torch.Tensor:
    """Logits [T, V] of the replacement model with every feature and error node at its prompt value."""
    writes = [rep.feature_writes(layer) + rep.errors[layer] for layer in range(len(rep.errors))]
    out = replacement_forward(model, rep, rep.record.embed_TD[None], writes)
    return model.get_output_embeddings()(out.final_BTD)[0]
