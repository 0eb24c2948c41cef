"""Hook points inside a decoder block, and capturing several of them from one forward.

Shape legend: B batch, T positions, D d_model.

Four kinds of hook point per block, named as TransformerLens/SAELens name them:

    resid-post  the block's output (the residual stream after it)  blocks.L.hook_resid_post
    attn-out    what attention adds to the residual                 blocks.L.hook_attn_out
    mlp-in      the MLP's input: the residual, normed               blocks.L.ln2.hook_normalized
    mlp-out     what the MLP adds to the residual                   blocks.L.hook_mlp_out

Where each lives is the model family's description (``pipeline.lm.families``): for Gemma 2/3
attn-out and mlp-out are the outputs of the post-attention and post-feedforward norms (the
sandwich norms), elsewhere the outputs of the attention and MLP modules; resid-post needs
no description, so it works on any decoder whose blocks ``decoder_blocks`` finds.

``capture`` runs the base model once and stops right after the deepest block
that holds a requested point, so later blocks and the head never run.
``edit_at`` replaces the activation at one point while a context is open
(splicing a reconstruction in, steering), with the same module hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pipeline.lm.families import Family, child, family_of
from pipeline.lm.hooks import _StopForward, block_output, check_layer, decoder_blocks, replace_block_output

KINDS = ("resid-post", "attn-out", "mlp-in", "mlp-out")
_TL_NAMES = {
    "resid-post": "blocks.{layer}.hook_resid_post",
    "attn-out": "blocks.{layer}.hook_attn_out",
    "mlp-in": "blocks.{layer}.ln2.hook_normalized",
    "mlp-out": "blocks.{layer}.hook_mlp_out",
}
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


@dataclass(frozen=True, order=True)
class HookPoint:
    """One place in the model: a kind (one of KINDS) at a block."""

    layer: int
    kind: str = "resid-post"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown hook point {self.kind!r}: use one of {', '.join(KINDS)}")

    @property
    def name(self) -> str:
        """TransformerLens/SAELens hook name, e.g. ``blocks.3.hook_mlp_out``."""
        return _TL_NAMES[self.kind].format(layer=self.layer)

    @classmethod
    def from_name(cls, name: str) -> HookPoint:
        """Parse a TransformerLens hook name written by ``name``; ValueError otherwise."""
        for kind, pattern in _TL_NAMES.items():
            prefix, suffix = pattern.split("{layer}")
            middle = name[len(prefix) : len(name) - len(suffix)] if name.startswith(prefix) else ""
            if name.endswith(suffix) and middle.isdigit():
                return cls(int(middle), kind)
        raise ValueError(f"unknown hook name {name!r}: expected e.g. {HookPoint(3, 'mlp-out').name}")


def as_hook_point(where: int | HookPoint) -> HookPoint:
    """A hook point as given, or a bare block index read as the residual stream after that block."""
    return where if isinstance(where, HookPoint) else HookPoint(where, "resid-post")


def parse_layers(text: str, n_layers: int) -> tuple[int, ...]:
    """``all``, ``5``, ``0-29`` or ``1,3,8-10`` -> sorted layers; ValueError naming the valid range."""
    if text.strip() == "all":
        return tuple(range(n_layers))
    layers: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"cannot read layers {text!r}: use all, 5, 0-29 or 1,3,8-10")
        lo, hi = int(first), int(last or first)
        if lo > hi:
            raise ValueError(f"layer range {part.strip()!r} is backwards")
        layers.update(check_layer(layer, n_layers) for layer in range(lo, hi + 1))
    return tuple(sorted(layers))


def _child(block: nn.Module, names: Sequence[str], what: str) -> nn.Module:
    for name in names:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"cannot find the {what} of {type(block).__name__} (looked for {', '.join(names)})")


def mlp_module(block: nn.Module) -> nn.Module:
    """The MLP sublayer of a decoder block (its input is normed, its output is added to the residual)."""
    return _child(block, _MLP_NAMES, "MLP")


def attention_module(block: nn.Module) -> nn.Module:
    """The attention sublayer of a decoder block."""
    return _child(block, _ATTENTION_NAMES, "attention")


def _module(family: Family | None, block: nn.Module, kind: str) -> nn.Module:
    """The module a hook point of ``kind`` reads: its output (resid-post, attn-out, mlp-out) or input (mlp-in)."""
    if kind == "resid-post":
        return block
    if kind == "attn-out":
        return family.attn_out_module(block)
    return child(block, family.mlp) if kind == "mlp-in" else family.mlp_out_module(block)


def _register(family: Family | None, block: nn.Module, kind: str, store) -> RemovableHandle:
    module = _module(family, block, kind)
    if kind == "mlp-in":
        return module.register_forward_pre_hook(lambda _m, inputs: store(inputs[0]))
    return module.register_forward_hook(lambda _m, _i, out: store(block_output(out)))


def _register_edit(family: Family | None, block: nn.Module, kind: str, fn: Callable) -> RemovableHandle:
    def replace_output(_module, _inputs, output):
        return replace_block_output(output, fn(block_output(output)))

    def replace_input(_module, inputs):
        return (fn(inputs[0]), *inputs[1:])

    module = _module(family, block, kind)
    if kind == "mlp-in":
        return module.register_forward_pre_hook(replace_input)
    return module.register_forward_hook(replace_output)


def _family_for(model: nn.Module, kinds: Iterable[str]) -> Family | None:
    """The model's family description, needed by every kind but resid-post."""
    return family_of(model) if any(kind != "resid-post" for kind in kinds) else None


def check_points(model: nn.Module, points: Iterable[HookPoint]) -> None:
    """Raise the ValueError ``capture`` would (a layer out of range, a family without a description)
    without running the model."""
    points = list(points)
    blocks = decoder_blocks(model)
    family = _family_for(model, [point.kind for point in points])
    for point in points:
        _module(family, blocks[check_layer(point.layer, len(blocks))], point.kind)


@contextmanager
def replace_mlp_out(
    model: nn.Module, layer: int, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """While open, what MLP ``layer`` adds to the residual (mlp-out [B, T, D]) becomes ``fn(mlp_in, mlp_out)``.

    ``mlp_in`` is the MLP's input of the same forward (for a transcoder splice or a feature edit).
    Hooks always removed.
    """
    family = family_of(model)
    block = decoder_blocks(model)[check_layer(layer, int(model.config.num_hidden_layers))]
    seen: dict[str, torch.Tensor] = {}

    def keep_input(_module, inputs):
        seen["mlp_in"] = inputs[0]

    def replace_output(_module, _inputs, output):
        return replace_block_output(output, fn(seen.pop("mlp_in"), block_output(output)))

    with ExitStack() as stack:
        stack.callback(child(block, family.mlp).register_forward_pre_hook(keep_input).remove)
        stack.callback(family.mlp_out_module(block).register_forward_hook(replace_output).remove)
        yield


@contextmanager
def edit_at(model: nn.Module, point: HookPoint, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While open, every forward replaces the activation at ``point`` [B, T, D] with ``fn(it)`` [B, T, D].

    resid-post edits the block's output, attn-out and mlp-out what attention and the MLP add
    to the residual (see the module docstring), mlp-in the MLP's input (a pre-hook: the MLP
    computes from the edited input); later computation sees the edit. The hook is always removed.
    """
    block = decoder_blocks(model)[check_layer(point.layer, int(model.config.num_hidden_layers))]
    handle = _register_edit(_family_for(model, [point.kind]), block, point.kind, fn)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def capture(
    model: nn.Module,
    input_ids_BT: torch.Tensor,
    points: Iterable[HookPoint],
    attention_mask_BT: torch.Tensor | None = None,
) -> dict[HookPoint, torch.Tensor]:
    """Activations [B, T, D] at every requested point from one forward of the base model.

    The forward stops once the deepest block holding a point has run.
    """
    wanted = sorted(set(points))
    if not wanted:
        raise ValueError("no hook points requested")
    n_layers = int(model.config.num_hidden_layers)
    blocks = decoder_blocks(model)
    captured: dict[HookPoint, torch.Tensor] = {}
    deepest = max(check_layer(point.layer, n_layers) for point in wanted)
    family = _family_for(model, [point.kind for point in wanted])

    def stop_after(_module, _inputs, _output):
        raise _StopForward

    with ExitStack() as stack:
        for point in wanted:
            handle = _register(family, blocks[point.layer], point.kind, lambda t, p=point: captured.__setitem__(p, t))
            stack.callback(handle.remove)
        stack.callback(blocks[deepest].register_forward_hook(stop_after).remove)
        try:
            model.base_model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False)
        except _StopForward:
            pass
    missing = [point.name for point in wanted if point not in captured]
    if missing:
        raise RuntimeError(f"hook points {', '.join(missing)} did not run during the forward pass")
    return captured
