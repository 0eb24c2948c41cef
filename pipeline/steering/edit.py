"""Steer a model by editing SAE features at one hook point: an immutable spec and a context manager.

Shape legend: B batch, T positions, D d_model, F latents.

For each steered feature i with value v, at the SAE's hook point (``edit_at``: the block
output for resid-post, the attention output, the MLP input or the MLP output):
  clamp : h' = h + (v - f_i(h)) * W_dec[i]      set the feature to v
  add   : h' = h + v * W_dec[i]                 push along the feature's direction
  scale : h' = h + (v - 1) * f_i(h) * W_dec[i]  multiply the feature by v
Everything else in h is kept: the SAE's reconstruction error and all other
features are untouched, and with several features the f_i are all read from
the unedited h. ``positions`` chooses where: "all", "prompt" (absolute position
< prompt_len) or "generated" (>= prompt_len). Absolute positions come from the
``position_ids`` the model passes to its blocks, so single-token decode steps
under a KV cache are placed correctly; models that pass none fall back to a
running count of positions seen since the context manager was entered.

Values as people write them (``Strength``): absolute (``3.5``), or a multiple of
the feature's typical activation from the index: its max (``8x``, ``8xmax``) or
its mean when active (``2xmean``). ``build_spec`` resolves them into a spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import nn

from pipeline.lm.hook_points import HookPoint, as_hook_point, edit_at
from pipeline.lm.hooks import decoder_blocks
from pipeline.sae.model import Sae

MODES = ("clamp", "add", "scale")
POSITIONS = ("all", "prompt", "generated")
UNITS = {"xmean": "mean", "xmax": "max", "x": "max"}
"""Suffix of a relative value -> the feature statistic it multiplies (longest suffix first)."""


class SteerError(ValueError):
    """A steering request cannot be carried out as given."""


class FeatureScale(NamedTuple):
    """A feature's typical activations over the indexed tokens, the units of relative values."""

    max: float
    mean: float
    """Mean activation where the feature is active."""


@dataclass(frozen=True)
class Strength:
    """A steering value as written: absolute, or relative to the feature's max or mean activation."""

    amount: float
    unit: Literal["absolute", "max", "mean"]
    text: str

    @property
    def relative(self) -> bool:
        return self.unit != "absolute"

    @classmethod
    def parse(cls, text: str) -> Strength:
        raw = text.strip().lower().replace(" ", "")
        suffix = next((s for s in UNITS if raw.endswith(s)), "")
        try:
            amount = float(raw[: len(raw) - len(suffix)])
        except ValueError as error:
            raise SteerError(
                f"bad value {text!r}: use a number like 3.5, or a multiple of the feature's max activation "
                "like 8x (8xmax), or of its mean activation when active like 2xmean"
            ) from error
        if not math.isfinite(amount):
            raise SteerError(f"bad value {text!r}: steering values must be finite numbers")
        return cls(amount, UNITS.get(suffix, "absolute"), text.strip())

    def resolve(self, mode: str, scale: FeatureScale | None, feature: int) -> float:
        """The absolute value for ``feature`` (``scale`` from the index; a multiplier in scale mode)."""
        if mode == "scale" or not self.relative:
            return self.amount
        if scale is None:
            raise SteerError(
                f"value {self.text!r} is relative to feature {feature}'s {self.unit} activation, which comes "
                "from the feature index: run `saescope index` first, or give an absolute value"
            )
        return self.amount * (scale.max if self.unit == "max" else scale.mean)


@dataclass(frozen=True)
class FeatureSteer:
    """How to edit one feature."""

    feature: int
    mode: Literal["clamp", "add", "scale"] = "clamp"
    value: float = 0.0
    """Target activation (clamp), coefficient (add) or multiplier (scale), in absolute units."""
    positions: Literal["all", "prompt", "generated"] = "all"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown steering mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions {self.positions!r}: use one of {', '.join(POSITIONS)}")


@dataclass(frozen=True)
class SteeringSpec:
    """Several feature edits at one SAE's layer, for prompts of a given length."""

    steers: tuple[FeatureSteer, ...]
    prompt_len: int = 0
    """Positions below this are the prompt (for "prompt" / "generated")."""

    def check(self, n_features: int) -> SteeringSpec:
        for steer in self.steers:
            if not 0 <= steer.feature < n_features:
                raise ValueError(
                    f"feature {steer.feature} out of range: this SAE has {n_features} features (0-{n_features - 1})"
                )
        return self


def build_spec(
    features: list[int],
    strengths: list[Strength],
    mode: str,
    positions: str,
    scales: dict[int, FeatureScale] | None,
) -> SteeringSpec:
    """The steering spec for features at given strengths (relative ones resolved with ``scales``)."""
    steers = []
    for feature, strength in zip(features, strengths, strict=True):
        value = strength.resolve(mode, (scales or {}).get(feature), feature)
        steers.append(FeatureSteer(feature, mode, value, positions))
    return SteeringSpec(tuple(steers))


def _position_mask(positions_BT: torch.Tensor, steer: FeatureSteer, prompt_len: int) -> torch.Tensor:
    if steer.positions == "all":
        return torch.ones_like(positions_BT, dtype=torch.bool)
    if steer.positions == "prompt":
        return positions_BT < prompt_len
    return positions_BT >= prompt_len


@torch.no_grad()
def steering_delta(sae: Sae, hidden_BTD: torch.Tensor, positions_BT: torch.Tensor, spec: SteeringSpec) -> torch.Tensor:
    """The edit to add to the hidden states [B, T, D] (zero where no steer applies)."""
    feats_BTF = sae.encode(hidden_BTD.float())
    delta = torch.zeros(hidden_BTD.shape, dtype=torch.float32, device=hidden_BTD.device)
    for steer in spec.steers:
        current = feats_BTF[..., steer.feature]
        if steer.mode == "clamp":
            coef = steer.value - current
        elif steer.mode == "add":
            coef = torch.full_like(current, steer.value)
        else:
            coef = (steer.value - 1.0) * current
        coef = coef * _position_mask(positions_BT, steer, spec.prompt_len)
        delta += coef.unsqueeze(-1) * sae.W_dec[steer.feature].float()
    return delta.to(hidden_BTD.dtype)


@dataclass
class SteeringHandle:
    """What the hook saw: the absolute positions of every edited forward call (for checks and counts)."""

    calls: list[torch.Tensor] = field(default_factory=list)
    seen: int = 0


@contextmanager
def steer(
    model: nn.Module,
    sae: Sae,
    point: HookPoint | int,
    spec: SteeringSpec,
    on_edit: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> Iterator[SteeringHandle]:
    """Attach the edit at ``point`` (a block index: its output) for the duration of the block; hooks always removed.

    ``on_edit(positions_BT, delta_BTD)`` is called after every edited forward (for tests and probes).
    """
    spec.check(sae.cfg.d_sae)
    point = as_hook_point(point)
    block = decoder_blocks(model)[point.layer]
    handle = SteeringHandle()
    current: dict[str, torch.Tensor | None] = {"positions": None}

    def read_positions(_module, args, kwargs):
        current["positions"] = kwargs.get("position_ids")

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        batch, length = hidden.shape[:2]
        positions = current["positions"]
        if positions is None:
            positions = torch.arange(handle.seen, handle.seen + length, device=hidden.device)
        positions = positions.to(hidden.device).expand(batch, length)
        handle.seen += length
        handle.calls.append(positions.detach().cpu())
        delta = steering_delta(sae, hidden, positions, spec)
        if on_edit is not None:
            on_edit(positions, delta)
        return hidden + delta

    reader = block.register_forward_pre_hook(read_positions, with_kwargs=True)
    try:
        with edit_at(model, point, edit):
            yield handle
    finally:
        reader.remove()
