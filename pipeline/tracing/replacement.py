"""The local replacement model of one prompt: the real model, linear in its residual stream.

Shape legend: B batch (rows of targets), T positions, D d_model, F latents, H heads, V vocabulary.

``record_prompt`` runs the real model once on one prompt (no padding) and keeps, per
block: the residual entering it, the attention pattern of every head, the input and
output of every norm the replacement freezes, the MLP's input (``mlp-in``) and output
(``mlp-out``, what the MLP adds to the residual); and the final norm and the logits.
Which modules these are is the model family's description (``pipeline.lm.families``).

``replacement_forward`` then recomputes the model with everything that is not linear
in the residual stream frozen at its recorded value:

  * every norm's scale per position: s = 1/rms(x) (RMSNorm: w * x * s; Gemma: (1 + w) * x * s)
    or s = 1/std(x) (LayerNorm: w * (x - mean x) * s + b, the centering kept live, as it is
    linear, the bias a constant); plus a frozen ``fix`` = recorded output - that recomputation,
    zero in exact arithmetic, which absorbs the float32 rounding HF's RMSNorms do in every
    dtype (~1e-7 relative), so that completeness holds to float64 precision. Gemma's
    sandwich norm after attention is frozen the same way;
  * attention: the softmax pattern is frozen, so queries, keys, rotary, q/k norms, score
    soft-caps and sliding-window masks are all inside it; only the value path stays linear
    (V projection with its bias, the pattern, the output projection: ``v_proj``/``o_proj``,
    GPT-2's Conv1D ``c_attn`` (its last third) and ``c_proj``, GPT-NeoX's per-head fused
    ``query_key_value`` and ``dense``). The pattern is the one the model computed on the
    prompt: ``record_prompt`` runs it with a recording attention function registered in
    transformers' ``AttentionInterface`` (eager attention, softmax in the model's dtype,
    float32 for half precision), which every family calls with its own queries, keys,
    scaling, soft-cap and mask (sliding windows included), and keeps the weights it returns;
  * GPT-NeoX's parallel residual: attention and the MLP both read the block's input;
  * each MLP is replaced by its transcoder: features with activations frozen at their
    prompt values (constants written as ``acts @ W_dec``), the decoder bias, the linear
    skip ``W_skip`` of the (linearized) MLP input, and a frozen error
    ``mlp_out - transcoder(mlp_in)`` per layer and position (for Gemma, ``mlp_out`` is after
    the post-feedforward norm, so that norm is inside what the transcoder replaces);
  * a final-logit soft-cap (Gemma 2: logits = c * tanh(z / c)) becomes a frozen factor per
    position and logit, logits = z * (recorded logits / z).

Per-layer transcoders and a cross-layer transcoder (``pipeline.sae.cross_layer``) share
one interface: ``Replacement.output_layers(l)`` and ``decoder_rows(l)`` say where the
features of source layer l write (layer l alone; or l..L-1, the rows concatenated), and
``feature_writes(l')`` sums the writes of every source into output layer l'. A CLT's
features are frozen per layer like a transcoder's; the output of MLP l' is replaced by
``b_dec[l'] + skip + sum_{l <= l'} acts_l @ W_dec[l][:, l' - l]`` plus its frozen error
``mlp_out[l'] - that``, so completeness holds the same way.

The result is affine in the embeddings (the residual entering block 0: token embeddings,
Gemma's sqrt(d_model) scale and GPT-2's position embeddings included) and in whatever is
written after each MLP; with every feature and error written, its logits equal the model's own.

Supported: the families of ``pipeline.lm.families``; any other model raises a ValueError
naming its model type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.lm.families import Family, child, family_of, final_norm_module
from pipeline.lm.hooks import decoder_blocks
from pipeline.sae.cross_layer import CltLayer, CrossLayerTranscoder

RECORDING_ATTENTION = "saescope_recording"
"""Name of the recording attention function in transformers' attention (and mask) interfaces."""


@dataclass(frozen=True)
class FrozenNorm:
    """One norm on the prompt, made linear in its input."""

    scale_T1: torch.Tensor
    """1/rms (RMSNorm) or 1/std (LayerNorm) of the recorded input."""
    fix_TD: torch.Tensor
    """Recorded output minus the frozen recomputation at the recorded input (rounding of HF's norm)."""


@dataclass(frozen=True)
class LayerRecord:
    """What one block computed on the prompt (batch dimension dropped)."""

    resid_pre_TD: torch.Tensor
    """The residual stream entering the block."""
    pattern_HTT: torch.Tensor
    """Attention pattern per head, query x key, as the model computed it."""
    attn_norm: FrozenNorm
    """The norm before attention."""
    mlp_norm: FrozenNorm
    """The norm before the MLP (its input: the residual after attention, or the block's input if parallel)."""
    attn_post_norm: FrozenNorm | None
    """Gemma's norm of attention's output before it is added, if the family has one."""
    mlp_in_TD: torch.Tensor
    """The MLP's input (``mlp-in``)."""
    mlp_out_TD: torch.Tensor
    """What the MLP adds to the residual (``mlp-out``)."""


@dataclass(frozen=True)
class PromptRecord:
    """One forward of the real model on one prompt."""

    ids_T: torch.Tensor
    embed_TD: torch.Tensor
    layers: tuple[LayerRecord, ...]
    resid_final_TD: torch.Tensor
    """The residual stream after the last block (input of the final norm)."""
    final_norm: FrozenNorm
    final_TD: torch.Tensor
    """The final norm's recorded output (what the unembedding reads)."""
    logits_TV: torch.Tensor
    logit_scale_TV: torch.Tensor | None = None
    """Frozen final soft-cap factor (recorded logits / pre-cap logits), or None without a soft-cap."""


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


def _norm_scale(kind: str, norm: nn.Module, x_TD: torch.Tensor) -> torch.Tensor:
    """[T, 1] the factor a norm divides by, frozen: 1/rms(x), or 1/std(x) for LayerNorm."""
    if kind == "layer":
        return torch.rsqrt(x_TD.var(-1, keepdim=True, unbiased=False) + _eps(norm))
    return torch.rsqrt(x_TD.pow(2).mean(-1, keepdim=True) + _eps(norm))


def frozen_norm(kind: str, norm: nn.Module, x_BTD: torch.Tensor, frozen: FrozenNorm) -> torch.Tensor:
    """The norm with its scale frozen: gain * (x [- mean x]) * scale (+ bias) + fix, affine in x."""
    if kind == "layer":
        x_BTD = x_BTD - x_BTD.mean(-1, keepdim=True)
    y_BTD = x_BTD * frozen.scale_T1
    weight = getattr(norm, "weight", None)
    if weight is not None:
        y_BTD = (1 + _as(weight, y_BTD) if kind == "rms_one_plus" else _as(weight, y_BTD)) * y_BTD
    bias = getattr(norm, "bias", None) if kind == "layer" else None
    return (y_BTD if bias is None else y_BTD + _as(bias, y_BTD)) + frozen.fix_TD


def freeze_norm(kind: str, norm: nn.Module, x_TD: torch.Tensor, y_TD: torch.Tensor) -> FrozenNorm:
    """Freeze a norm at its recorded input x and output y: scale from x, fix = y - the frozen norm of x."""
    scale_T1 = _norm_scale(kind, norm, x_TD)
    return FrozenNorm(scale_T1, y_TD - frozen_norm(kind, norm, x_TD, FrozenNorm(scale_T1, torch.zeros_like(x_TD))))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_pattern(attn: nn.Module, h_TD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Causal softmax pattern [H, T, T] of a rotary attention module with separate q/k projections on its
    (normed) input: Llama, Mistral, Qwen2, Qwen3 and Gemma 2/3 (their q/k norms, score soft-cap and sliding
    window included). ``cos_sin``: the rotary (cos, sin) the block hands its attention module.

    Tracing itself freezes the pattern the model computed (``record_prompt``); this recomputation is
    for looking inside it (and is tested equal to the recorded pattern).
    """
    T, hd = h_TD.shape[0], attn.head_dim
    q_THd, k_THd = attn.q_proj(h_TD).view(T, -1, hd), attn.k_proj(h_TD).view(T, -1, hd)
    if hasattr(attn, "q_norm"):
        q_THd, k_THd = attn.q_norm(q_THd), attn.k_norm(k_THd)
    q_HTd, k_HTd = q_THd.transpose(0, 1), k_THd.transpose(0, 1)
    cos, sin = (c.reshape(T, hd).to(h_TD.dtype) for c in cos_sin)
    q_HTd, k_HTd = q_HTd * cos + _rotate_half(q_HTd) * sin, k_HTd * cos + _rotate_half(k_HTd) * sin
    k_HTd = k_HTd.repeat_interleave(q_HTd.shape[0] // k_HTd.shape[0], dim=0)
    scores_HTT = q_HTd @ k_HTd.transpose(1, 2) * attn.scaling
    softcap = getattr(attn, "attn_logit_softcapping", None)
    if softcap:
        scores_HTT = torch.tanh(scores_HTT / softcap) * softcap
    query_T1, key_1T = torch.arange(T, device=h_TD.device)[:, None], torch.arange(T, device=h_TD.device)[None]
    hidden_TT = key_1T > query_T1
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)
    if window:
        hidden_TT |= query_T1 - key_1T >= window
    return scores_HTT.masked_fill(hidden_TT, float("-inf")).softmax(-1)


def recording_attention_call(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kw):
    """Eager attention [B, H, T, d] that returns its pattern, softmax in the inputs' dtype (float32 for half
    precision). Called by every supported family with its own queries, keys, scaling, soft-cap and mask."""
    if kw.get("s_aux") is not None:
        raise ValueError(f"{type(module).__name__} uses attention sinks, which tracing does not model")
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(2, 3) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    upcast = query.dtype in (torch.float16, torch.bfloat16)
    pattern = (scores.float() if upcast else scores).softmax(-1).to(query.dtype)
    return (pattern @ value).transpose(1, 2).contiguous(), pattern


@contextmanager
def recording_attention(model: nn.Module) -> Iterator[None]:
    """While open, the model's attention modules run ``recording_attention_call`` (and return its pattern)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(RECORDING_ATTENTION, recording_attention_call)
    AttentionMaskInterface.register(RECORDING_ATTENTION, eager_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(RECORDING_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _keep_output(seen: dict, key: str, index: int = 0):
    def hook(_module, _inputs, output):
        value = output[index] if isinstance(output, tuple) else output
        if value is not None:
            seen[key] = value[0]

    return hook


def _keep_norm(seen: dict, key: str):
    def hook(_module, inputs, output):
        seen[key] = (inputs[0][0], output[0])

    return hook


def _hooks(stack: ExitStack, family: Family, block: nn.Module, seen: dict) -> None:
    def block_pre(_m, args, kwargs):
        seen["resid_pre"] = (args[0] if args else kwargs["hidden_states"])[0]

    def mlp_pre(_m, inputs):
        seen["mlp_in"] = inputs[0][0]

    stack.callback(block.register_forward_pre_hook(block_pre, with_kwargs=True).remove)
    stack.callback(child(block, family.attention).register_forward_hook(_keep_output(seen, "pattern", 1)).remove)
    for role in ("attn_norm", "mlp_norm", "attn_post_norm"):
        name = getattr(family, role)
        if name is not None:
            stack.callback(child(block, name).register_forward_hook(_keep_norm(seen, role)).remove)
    stack.callback(child(block, family.mlp).register_forward_pre_hook(mlp_pre).remove)
    stack.callback(family.mlp_out_module(block).register_forward_hook(_keep_output(seen, "mlp_out")).remove)


def _layer_record(family: Family, block: nn.Module, seen: dict) -> LayerRecord:
    pattern = seen.get("pattern")
    if pattern is None:
        raise ValueError(f"{type(block).__name__}'s attention returned no pattern: it cannot be traced")

    def freeze(role: str) -> FrozenNorm | None:
        name = getattr(family, role)
        return None if name is None else freeze_norm(family.norm, child(block, name), *seen[role])

    return LayerRecord(
        resid_pre_TD=seen["resid_pre"],
        pattern_HTT=pattern,
        attn_norm=freeze("attn_norm"),
        mlp_norm=freeze("mlp_norm"),
        attn_post_norm=freeze("attn_post_norm"),
        mlp_in_TD=seen["mlp_in"],
        mlp_out_TD=seen["mlp_out"],
    )


def _logit_scale(model: nn.Module, family: Family, z_TV: torch.Tensor, logits_TV: torch.Tensor):
    """The frozen soft-cap factor logits / z (1 where z is 0), or None without a final soft-cap."""
    if family.final_softcap(model.config) is None:
        return None
    return torch.where(z_TV == 0, torch.ones_like(z_TV), logits_TV / z_TV)


@torch.no_grad()
def record_prompt(model: nn.Module, ids_T: torch.Tensor) -> PromptRecord:
    """Run the model once on one unpadded prompt [T] and keep what the replacement model freezes."""
    if ids_T.ndim != 1 or ids_T.numel() == 0:
        raise ValueError(f"record_prompt takes one prompt as a 1-d tensor of token ids, got shape {tuple(ids_T.shape)}")
    family = family_of(model)
    blocks = decoder_blocks(model)
    seen: list[dict] = [{} for _ in blocks]
    final: dict = {}
    final_norm = final_norm_module(model, family)
    with ExitStack() as stack:
        for block, store in zip(blocks, seen, strict=True):
            _hooks(stack, family, block, store)
        stack.callback(final_norm.register_forward_hook(_keep_norm(final, "norm")).remove)
        stack.callback(model.get_output_embeddings().register_forward_hook(_keep_output(final, "z")).remove)
        stack.enter_context(recording_attention(model))
        logits_TV = model(input_ids=ids_T[None], use_cache=False).logits[0]
    layers = tuple(_layer_record(family, block, store) for block, store in zip(blocks, seen, strict=True))
    x_TD, y_TD = final["norm"]
    return PromptRecord(
        ids_T=ids_T,
        embed_TD=layers[0].resid_pre_TD,
        layers=layers,
        resid_final_TD=x_TD,
        final_norm=freeze_norm(family.norm, final_norm, x_TD, y_TD),
        final_TD=y_TD,
        logits_TV=logits_TV,
        logit_scale_TV=_logit_scale(model, family, final["z"], logits_TV),
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


def _heads(x_BTX: torch.Tensor, head_dim: int) -> torch.Tensor:
    B, T, _ = x_BTX.shape
    return x_BTX.view(B, T, -1, head_dim).transpose(1, 2)


def value_vectors(family: Family, attn: nn.Module, h_BTD: torch.Tensor) -> torch.Tensor:
    """The value vectors [B, H_kv, T, d] (bias included) of attention's input."""
    if family.value_layout == "gpt2":
        D = attn.split_size
        v_BTD = h_BTD @ _as(attn.c_attn.weight[:, 2 * D :], h_BTD) + _as(attn.c_attn.bias[2 * D :], h_BTD)
        return _heads(v_BTD, attn.head_dim)
    if family.value_layout == "neox":
        layer, d = attn.query_key_value, attn.head_size
        W_vD = layer.weight.view(-1, 3, d, layer.weight.shape[-1])[:, 2].reshape(-1, layer.weight.shape[-1])
        b_v = None if layer.bias is None else _as(layer.bias.view(-1, 3, d)[:, 2].reshape(-1), h_BTD)
        return _heads(F.linear(h_BTD, _as(W_vD, h_BTD), b_v), d)
    return _heads(attn.v_proj(h_BTD), attn.head_dim)


def output_projection(family: Family, attn: nn.Module, z_BTX: torch.Tensor) -> torch.Tensor:
    if family.value_layout == "gpt2":
        return attn.c_proj(z_BTX)
    return attn.dense(z_BTX) if family.value_layout == "neox" else attn.o_proj(z_BTX)


def _value_path(family: Family, attn: nn.Module, h_BTD: torch.Tensor, pattern_HTT: torch.Tensor) -> torch.Tensor:
    """Attention with its pattern frozen: output projection of (pattern @ values); linear in h (plus biases)."""
    B, T, _ = h_BTD.shape
    v_BhTd = value_vectors(family, attn, h_BTD)
    v_BHTd = v_BhTd.repeat_interleave(pattern_HTT.shape[0] // v_BhTd.shape[1], dim=1)
    z_BTHd = (pattern_HTT @ v_BHTd).transpose(1, 2)
    return output_projection(family, attn, z_BTHd.reshape(B, T, -1))


@dataclass(frozen=True)
class LinearOutputs:
    """What the frozen linear model computed: every MLP input and, if it ran to the end, the final normed residual."""

    mlp_in: tuple[torch.Tensor, ...]
    """Per layer run [B, T, D]."""
    final_BTD: torch.Tensor | None
    attn_in: tuple[torch.Tensor, ...] = ()
    """Per layer run [B, T, D]: attention's input, the frozen attention norm's output (what queries, keys and
    values are computed from)."""


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
    family = family_of(model)
    parallel = family.parallel(model.config)
    blocks = decoder_blocks(model)
    stop = len(blocks) - 1 if last_layer is None else last_layer
    x_BTD, mlp_ins, attn_ins = embed_BTD, [], []
    for layer, (block, rec, tc) in enumerate(zip(blocks, rep.record.layers, rep.transcoders, strict=True)):
        h_BTD = frozen_norm(family.norm, child(block, family.attn_norm), x_BTD, rec.attn_norm)
        attn_ins.append(h_BTD)
        a_BTD = _value_path(family, child(block, family.attention), h_BTD, rec.pattern_HTT)
        if family.attn_post_norm is not None:
            a_BTD = frozen_norm(family.norm, child(block, family.attn_post_norm), a_BTD, rec.attn_post_norm)
        mid_BTD = x_BTD if parallel else x_BTD + a_BTD
        m_BTD = frozen_norm(family.norm, child(block, family.mlp_norm), mid_BTD, rec.mlp_norm)
        mlp_ins.append(m_BTD)
        if layer == stop and last_layer is not None:
            return LinearOutputs(tuple(mlp_ins), None, tuple(attn_ins))
        x_BTD = x_BTD + a_BTD + _skip(tc, m_BTD) + _as(tc.b_dec, m_BTD) + writes[layer]
    final_BTD = frozen_norm(family.norm, final_norm_module(model, family), x_BTD, rep.record.final_norm)
    return LinearOutputs(tuple(mlp_ins), final_BTD, tuple(attn_ins))


def unembed(model: nn.Module, record: PromptRecord, final_BTD: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of final normed residuals, the final soft-cap (if any) frozen at its prompt factor."""
    z_BTV = model.get_output_embeddings()(final_BTD)
    return z_BTV if record.logit_scale_TV is None else z_BTV * record.logit_scale_TV


def replacement_logits(model: nn.Module, rep: Replacement) -> torch.Tensor:
    """Logits [T, V] of the replacement model with every feature and error node at its prompt value."""
    writes = [rep.feature_writes(layer) + rep.errors[layer] for layer in range(len(rep.errors))]
    out = replacement_forward(model, rep, rep.record.embed_TD[None], writes)
    return unembed(model, rep.record, out.final_BTD)[0]
