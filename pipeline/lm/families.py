"""One small description per model family: where its hook points are and what the tracer freezes.

Every verb reads a Hugging Face decoder through this table (``family_of``) and never tests a
model's class name anywhere else. A row names, inside one decoder block:

  * the attention and MLP submodules; ``mlp-in`` is the MLP's input in every family;
  * the norms by role: before attention, before the MLP, and (Gemma 2/3's sandwich norms)
    after attention and after the MLP; ``attn-out`` and ``mlp-out`` are what the block adds
    to the residual stream, so for Gemma they are the outputs of those post-norms;
  * the norm kind: ``rms`` (w * x / rms(x)), ``rms_one_plus`` (Gemma: (1 + w) * x / rms(x)),
    ``layer`` (LayerNorm: w * (x - mean x) / std(x) + b);
  * how the value path of attention is laid out: ``split`` (v_proj, o_proj), ``gpt2``
    (one Conv1D ``c_attn`` [D, 3D] whose last third is V, then ``c_proj``), ``neox``
    (one Linear ``query_key_value`` laid out per head as [q | k | v], then ``dense``);
  * whether attention and MLP read the same residual (GPT-NeoX ``use_parallel_residual``);
  * the final norm, an attribute of the base model (``model.norm``, ``transformer.ln_f``,
    ``gpt_neox.final_layer_norm``);
  * what shapes the attention pattern or the logits beyond q.k: an embedding scale
    (Gemma multiplies embeddings by sqrt(d_model)), attention and final-logit soft-caps
    (config attributes), sliding windows, q/k norms. The tracer freezes the pattern as the
    model computed it, so these only document it, except the final soft-cap, which the
    tracer freezes as a per-logit factor.

A model type missing from the table gets one ValueError naming it and the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

NormKind = Literal["rms", "rms_one_plus", "layer"]
ValueLayout = Literal["split", "gpt2", "neox"]


@dataclass(frozen=True)
class Family:
    """Where one family keeps its hook points and what the tracer must freeze."""

    name: str
    """Human-readable family name."""
    model_types: tuple[str, ...]
    """``config.model_type`` values of this family."""
    norm: NormKind
    """Kind of every norm in the model."""
    attention: str
    """Attention submodule of a block."""
    mlp: str
    """MLP submodule of a block (its input is ``mlp-in``)."""
    attn_norm: str
    """Norm before attention."""
    mlp_norm: str
    """Norm before the MLP."""
    final_norm: str
    """Final norm, an attribute of the base model."""
    value_layout: ValueLayout = "split"
    """How the V and output projections are stored (see the module docstring)."""
    attn_post_norm: str | None = None
    """Norm applied to attention's output before it is added (Gemma's post_attention_layernorm)."""
    mlp_post_norm: str | None = None
    """Norm applied to the MLP's output before it is added (Gemma's post_feedforward_layernorm)."""
    parallel_attr: str | None = None
    """Config flag that makes attention and MLP read the same residual (GPT-NeoX)."""
    embed_scale: bool = False
    """Embeddings are multiplied by sqrt(d_model) (Gemma): part of the recorded embedding."""
    attn_softcap_attr: str | None = None
    """Config attribute of the attention-score soft-cap (inside the frozen pattern)."""
    final_softcap_attr: str | None = None
    """Config attribute of the final-logit soft-cap c: logits = c * tanh(z / c)."""
    sliding_window: bool = False
    """Some layers may attend within a window (inside the frozen pattern)."""
    qk_norm: bool = False
    """Queries and keys are normed per head (inside the frozen pattern)."""
    rotary: bool = True
    """Rotary position embeddings (GPT-2 adds learned positions to the embeddings instead)."""

    def attn_out_module(self, block: nn.Module) -> nn.Module:
        """The module whose output is ``attn-out`` (what attention adds to the residual)."""
        return child(block, self.attn_post_norm or self.attention)

    def mlp_out_module(self, block: nn.Module) -> nn.Module:
        """The module whose output is ``mlp-out`` (what the MLP adds to the residual)."""
        return child(block, self.mlp_post_norm or self.mlp)

    def parallel(self, config) -> bool:
        """Whether attention and MLP both read the block's input residual."""
        return bool(self.parallel_attr and getattr(config, self.parallel_attr, False))

    def final_softcap(self, config) -> float | None:
        """The final-logit soft-cap c, or None."""
        value = getattr(config, self.final_softcap_attr, None) if self.final_softcap_attr else None
        return float(value) if value else None


_LLAMA_LIKE = dict(
    norm="rms", attention="self_attn", mlp="mlp", attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
    final_norm="norm",
)  # fmt: skip
_GEMMA = dict(
    norm="rms_one_plus", attention="self_attn", mlp="mlp", attn_norm="input_layernorm",
    mlp_norm="pre_feedforward_layernorm", attn_post_norm="post_attention_layernorm",
    mlp_post_norm="post_feedforward_layernorm", final_norm="norm", embed_scale=True,
    attn_softcap_attr="attn_logit_softcapping", final_softcap_attr="final_logit_softcapping", sliding_window=True,
)  # fmt: skip

FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",), **_LLAMA_LIKE),
    Family("Mistral", ("mistral",), sliding_window=True, **_LLAMA_LIKE),
    Family("Qwen2", ("qwen2",), sliding_window=True, **_LLAMA_LIKE),
    Family("Qwen3", ("qwen3",), sliding_window=True, qk_norm=True, **_LLAMA_LIKE),
    Family("Gemma 2", ("gemma2",), **_GEMMA),
    Family("Gemma 3", ("gemma3_text",), qk_norm=True, **_GEMMA),
    Family(
        "GPT-2",
        ("gpt2",),
        norm="layer",
        attention="attn",
        mlp="mlp",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        final_norm="ln_f",
        value_layout="gpt2",
        rotary=False,
    ),
    Family(
        "GPT-NeoX",
        ("gpt_neox",),
        norm="layer",
        attention="attention",
        mlp="mlp",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        final_norm="final_layer_norm",
        value_layout="neox",
        parallel_attr="use_parallel_residual",
    ),
)


def child(module: nn.Module, name: str) -> nn.Module:
    """``module.name``, or a ValueError naming what is missing."""
    found = getattr(module, name, None)
    if not isinstance(found, nn.Module):
        raise ValueError(f"{type(module).__name__} has no submodule {name!r}, which its family description names")
    return found


def supported_types() -> str:
    """The model types in the table, comma-separated."""
    return ", ".join(t for family in FAMILIES for t in family.model_types)


def known_family(model: nn.Module) -> Family | None:
    """The description of ``model``'s family, by ``config.model_type``, or None if it is not in the table."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((family for family in FAMILIES if model_type in family.model_types), None)


def family_of(model: nn.Module) -> Family:
    """The description of ``model``'s family, by ``config.model_type``; ValueError if it is not in the table."""
    family = known_family(model)
    if family is not None:
        return family
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise ValueError(
        f"model type {model_type!r} ({type(model).__name__}) has no family description, so its hook points "
        f"and what tracing freezes are unknown: supported are {supported_types()} "
        "(add a row to pipeline/lm/families.py naming its norms, attention, MLP and final norm)"
    )


def final_norm_module(model: nn.Module, family: Family | None = None) -> nn.Module:
    """The final norm of the model (applied to the last residual before the unembedding)."""
    return child(model.base_model, (family or family_of(model)).final_norm)
