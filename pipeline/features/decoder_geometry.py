"""What a feature's decoder direction does: its direct logit effects and its nearest neighbours.

Shape legend: F features, D d_model, V vocabulary, T top entries kept.

Logit effects follow the direct path used by SAEDashboard and Neuronpedia
(TransformerLens folds the final norm's weight into W_U):

    effect[i, v] = (W_dec[i] * gamma) . W_U[v]

with ``gamma`` the elementwise gain of the model's final norm (RMSNorm or
LayerNorm: its weight; Gemma's RMSNorm: 1 + its weight). The norm's input-dependent division (by the RMS or the standard
deviation) and LayerNorm's centering are not applied: the numbers rank tokens
by how directly the feature pushes them up (promoted) or down (suppressed).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.lm.families import final_norm_module, known_family

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


def final_norm_weight(model: nn.Module) -> torch.Tensor | None:
    """Elementwise gain of the model's final normalization, if it has one (from its family description if known)."""
    family = known_family(model)
    if family is not None:
        weight = getattr(final_norm_module(model, family), "weight", None)
        if weight is None:
            return None
        return (1 + weight.detach()) if family.norm == "rms_one_plus" else weight.detach()
    base = model.base_model
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if module is not None and getattr(module, "weight", None) is not None:
            return module.weight.detach()
    return None


def unembedding(model: nn.Module) -> torch.Tensor:
    """The LM head's weight [V, D]."""
    return model.get_output_embeddings().weight.detach()


def _directions(W_dec_FD, W_U_VD, gamma_D) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder rows times the final norm's weight [F, D], unembedding [V, D]), float32 on one device."""
    direction_FD = W_dec_FD.float() * (gamma_D.float() if gamma_D is not None else 1.0)
    return direction_FD, W_U_VD.float().to(direction_FD.device)


def _effect_blocks(direction_FD: torch.Tensor, W_U_VD: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    """Effects [c, V] of ``chunk`` features at a time, in one reused buffer (valid until the next block).

    Fresh ~100 MB products per chunk fragmented the heap under tune_allocator and
    sometimes held several GB (measured 1.2 vs 3.5-4 GiB peak).
    """
    buffer = direction_FD.new_empty(min(chunk, direction_FD.shape[0]), W_U_VD.shape[0])
    for start in range(0, direction_FD.shape[0], chunk):
        block = direction_FD[start : start + chunk]
        yield torch.matmul(block, W_U_VD.T, out=buffer[: block.shape[0]])


def _top_raw(effects: torch.Tensor, top_n: int) -> tuple[torch.Tensor, ...]:
    up = effects.topk(top_n, dim=1)
    down = effects.topk(top_n, dim=1, largest=False)
    return up.values, up.indices, down.values, down.indices


@torch.no_grad()
def logit_effects(
    W_dec_FD: torch.Tensor,
    W_U_VD: torch.Tensor,
    gamma_D: torch.Tensor | None,
    top_n: int = 10,
    chunk: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(promoted values, promoted ids, suppressed values, suppressed ids), each [F, top_n].

    Suppressed values are the most negative effects, most negative first.
    """
    direction_FD, W_U = _directions(W_dec_FD, W_U_VD, gamma_D)
    parts = [_top_raw(effects, top_n) for effects in _effect_blocks(direction_FD, W_U, chunk)]
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


@torch.no_grad()
def nearest_by_decoder(W_dec_FD: torch.Tensor, top_n: int = 10, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine [F, top_n], neighbour ids [F, top_n]) of the most similar other decoder directions."""
    unit = F.normalize(W_dec_FD.float(), dim=1)
    n = unit.shape[0]
    top_n = min(top_n, n - 1)
    buffer = unit.new_empty(min(chunk, n), n)
    cosines, ids = [], []
    for start in range(0, n, chunk):
        block = unit[start : start + chunk]
        sims = torch.matmul(block, unit.T, out=buffer[: block.shape[0]])
        own = torch.arange(sims.shape[0])
        sims[own, own + start] = -float("inf")
        best = sims.topk(top_n, dim=1)
        cosines.append(best.values)
        ids.append(best.indices)
    return torch.cat(cosines), torch.cat(ids)


@torch.no_grad()
def token_effect_moments(
    direction_FD: torch.Tensor, W_U_VD: torch.Tensor, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [V], standard deviation [V]) of each token's effect over all features (float64 sums)."""
    n_features, W_U = direction_FD.shape[0], W_U_VD.float().to(direction_FD.device)
    total = torch.zeros(W_U.shape[0], dtype=torch.float64, device=W_U.device)
    squares = torch.zeros_like(total)
    for effects in _effect_blocks(direction_FD, W_U, chunk):
        total += effects.sum(0, dtype=torch.float64)
        squares += effects.double().square().sum(0)
    mean = total / n_features
    std = (squares / n_features - mean.square()).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-8)


@torch.no_grad()
def logit_effect_rankings(
    W_dec_FD: torch.Tensor,
    W_U_VD: torch.Tensor,
    gamma_D: torch.Tensor | None,
    top_n: int = 10,
    chunk: int = 512,
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Both rankings of output tokens in two passes over the effects: (raw, standardized).

    raw is what ``logit_effects`` returns. standardized ranks by
    z[i, v] = (effect[i, v] - mean_i effect[., v]) / std_i effect[., v], so a token that every
    direction pushes (a "junk" token) no longer tops every list; it holds promoted/suppressed
    ids, their z-scores and their raw effects, each [F, top_n].
    """
    direction_FD, W_U = _directions(W_dec_FD, W_U_VD, gamma_D)
    mean_V, std_V = token_effect_moments(direction_FD, W_U, chunk)
    raw_parts, parts = [], {}
    for raw in _effect_blocks(direction_FD, W_U, chunk):
        raw_parts.append(_top_raw(raw, top_n))
        z = (raw - mean_V) / std_V
        for side, largest in (("promoted", True), ("suppressed", False)):
            best = z.topk(top_n, dim=1, largest=largest)
            parts.setdefault(f"{side}_ids", []).append(best.indices)
            parts.setdefault(f"{side}_z", []).append(best.values)
            parts.setdefault(f"{side}_raw", []).append(raw.gather(1, best.indices))
    raw_ranking = tuple(torch.cat(column) for column in zip(*raw_parts, strict=True))
    return raw_ranking, {name: torch.cat(chunks) for name, chunks in parts.items()}
