"""Generate with and without steering from the same seed, and measure what the steering did.

Shape legend: T positions, V vocabulary, F latents.

``sample`` is a plain KV-cache loop (temperature, top-p, a private seeded
generator, stop at EOS), so the default and the steered run draw the same random
numbers. ``compare`` then teacher-forces both texts through the model with and
without the edit to report, per generated token, the log-probability of the
chosen token under the other condition, the steered features' activations
(re-encoded without steering, read at the SAE's hook point), and the mean KL
between the two next-token distributions. Where a function takes ``layer`` it
takes a HookPoint too (a bare block index is the residual stream after it).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.lm.hook_points import as_hook_point, capture
from pipeline.sae.model import Sae
from pipeline.steering.edit import SteeringSpec, steer


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens."""

    max_new_tokens: int = 40
    temperature: float = 0.5
    """0 means greedy."""
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def check_length(prompt_len: int, max_new_tokens: int, max_positions: int | None) -> None:
    """Prompt plus new tokens must fit the model's positions (a ValueError that says so)."""
    if max_positions is not None and prompt_len + max_new_tokens > max_positions:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} with a {prompt_len}-token prompt is beyond the model's "
            f"{max_positions} positions"
        )


def pick_token(logits_V: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> int:
    """Greedy at temperature 0, else nucleus sampling with the given generator."""
    if cfg.temperature == 0:
        return int(logits_V.argmax())
    probs = F.softmax(logits_V.float() / cfg.temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < cfg.top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs.cpu() / sorted_probs.sum().cpu(), 1, generator=generator)
    return int(order[choice.to(order.device)])


@torch.inference_mode()
def sample(model: nn.Module, prompt_ids: list[int], cfg: SamplingConfig, eos_id: int | None) -> list[int]:
    """New token ids after the prompt (KV cache; stops at EOS or max_new_tokens)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(cfg.seed)
    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
    generated: list[int] = []
    for _ in range(cfg.max_new_tokens):
        token = pick_token(out.logits[0, -1], cfg, generator)
        generated.append(token)
        if token == eos_id or len(generated) == cfg.max_new_tokens:
            break
        out = model(
            input_ids=torch.tensor([[token]], device=device), past_key_values=out.past_key_values, use_cache=True
        )
    return generated


@torch.inference_mode()
def log_probs(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """log p(next token) for every position of ``ids`` [T, V] (teacher forcing, no cache)."""
    device = next(model.parameters()).device
    return F.log_softmax(model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float(), -1)


@dataclass(frozen=True)
class RunReport:
    """One generation and what it looks like under the other condition."""

    token_ids: list[int]
    """Generated ids."""
    logprob_self: list[float]
    """log p of each generated token under the condition that produced it."""
    logprob_other: list[float]
    """log p of each generated token under the other condition (steered <-> default)."""
    feature_acts: dict[int, list[float]]
    """Per steered feature, its activation at each generated position, re-encoded without steering."""
    kl: float
    """Mean over generated positions of KL(p_default || p_steered), teacher-forced on this text."""

    def mean_activation(self, feature: int) -> float:
        acts = self.feature_acts[feature]
        return sum(acts) / max(1, len(acts))


def _scores(model, sae, layer, spec, prompt_ids, new_ids, steered_first: bool) -> RunReport:
    ids = prompt_ids + new_ids
    span = slice(len(prompt_ids) - 1, len(ids) - 1)  # positions predicting the generated tokens
    targets = torch.tensor(new_ids)
    with steer(model, sae, layer, spec):
        lp_steered = log_probs(model, ids)[span].cpu()
    lp_default = log_probs(model, ids)[span].cpu()
    own, other = (lp_steered, lp_default) if steered_first else (lp_default, lp_steered)
    pick = lambda lp: lp.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()  # noqa: E731
    kl = (lp_default.exp() * (lp_default - lp_steered)).sum(-1).mean().item()
    device = next(model.parameters()).device
    point = as_hook_point(layer)
    with torch.inference_mode():
        hidden = capture(model, torch.tensor([ids], device=device), [point])[point][0, len(prompt_ids) :]
        feats = sae.encode(hidden.float()).cpu()
    acts = {s.feature: feats[:, s.feature].tolist() for s in spec.steers}
    return RunReport(new_ids, pick(own), pick(other), acts, kl)


@dataclass(frozen=True)
class Comparison:
    """Default and steered generations from the same prompt and seed."""

    default: RunReport
    steered: RunReport


def compare(
    model: nn.Module,
    sae: Sae,
    layer: int,
    spec: SteeringSpec,
    prompt_ids: list[int],
    cfg: SamplingConfig,
    eos_id: int | None,
    default: list[int] | None = None,
) -> Comparison:
    """Generate without and with the edit (same seed), then score each text under both conditions.

    Pass ``default`` (ids of an earlier default generation with the same settings) to skip regenerating it.
    """
    spec = SteeringSpec(spec.steers, prompt_len=len(prompt_ids))
    default_ids = default if default is not None else generate(model, sae, layer, None, prompt_ids, cfg, eos_id)
    steered_ids = generate(model, sae, layer, spec, prompt_ids, cfg, eos_id)
    return Comparison(
        default=_scores(model, sae, layer, spec, prompt_ids, default_ids, steered_first=False),
        steered=_scores(model, sae, layer, spec, prompt_ids, steered_ids, steered_first=True),
    )


def sweep(
    model: nn.Module,
    sae: Sae,
    layer: int,
    specs: list[SteeringSpec],
    prompt_ids: list[int],
    cfg: SamplingConfig,
    eos_id: int | None,
) -> list[Comparison]:
    """``compare`` for each spec (e.g. one feature at several strengths); the default text is generated once."""
    results, default = [], None
    for spec in specs:
        result = compare(model, sae, layer, spec, prompt_ids, cfg, eos_id, default)
        default = result.default.token_ids
        results.append(result)
    return results


def generate(model, sae, layer, spec: SteeringSpec | None, prompt_ids, cfg, eos_id) -> list[int]:
    """``sample`` with the edit attached (or not, when spec is None)."""
    context = steer(model, sae, layer, spec) if spec is not None else nullcontext()
    with context:
        return sample(model, prompt_ids, cfg, eos_id)
