"""What the language model loses when the SAE's reconstruction replaces the activation at its hook point.

Shape legend: B contexts, T positions, D d_model, V vocabulary.

For each batch of held-out contexts the full model runs three times:
  clean   : untouched;
  spliced : the activation at the hook point replaced by the SAE's reconstruction;
  zero    : the activation at the hook point replaced by zeros (the ablation baseline).
The hook point is any of ``pipeline.lm.hook_points``' kinds (``edit_at`` places the
replacement: the block output, the attention output, the MLP input or the MLP output).
Only positions holding ordinary tokens are replaced; special-token positions
(BOS, separators) keep their clean values in both spliced and zero runs, since
the SAE never saw them in training. Next-token cross-entropy is averaged over
positions t whose input token t and target token t+1 are both ordinary, and

    CE-loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)
    delta LM loss     = CE_spliced - CE_clean
    KL                = mean over the same positions of KL(p_clean || p_spliced)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.lm.hook_points import HookPoint, as_hook_point, edit_at


@dataclass(frozen=True)
class SpliceMetrics:
    """Language-model loss with the SAE spliced in, against clean and zero-ablated runs."""

    n_tokens: int
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_loss_recovered: float
    delta_lm_loss: float
    kl_spliced: float
    """Mean KL(clean || spliced) in nats."""
    kl_zero: float
    """Mean KL(clean || zero-ablated) in nats."""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(CE_zero - CE_spliced) / (CE_zero - CE_clean)."""
    return (ce_zero - ce_spliced) / (ce_zero - ce_clean)


def _replacing(replace: Callable[[torch.Tensor], torch.Tensor], ordinary_BT: torch.Tensor):
    """hidden [B, T, D] -> a copy with the ordinary positions replaced by ``replace`` of them [N, D]."""

    def patch(hidden_BTD: torch.Tensor) -> torch.Tensor:
        patched = hidden_BTD.clone()
        patched[ordinary_BT] = replace(hidden_BTD[ordinary_BT]).to(hidden_BTD.dtype)
        return patched

    return patch


def _logits(model: nn.Module, ids_BT: torch.Tensor, point: HookPoint | None = None, patch=None) -> torch.Tensor:
    if patch is None:
        return model(input_ids=ids_BT, use_cache=False).logits.float()
    with edit_at(model, point, patch):
        return model(input_ids=ids_BT, use_cache=False).logits.float()


def token_ce_and_kl(clean_BTV, other_BTV, targets_BT, scored_BT) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored position: CE of the other run on the targets, and KL(clean || other)."""
    logp_clean = F.log_softmax(clean_BTV[scored_BT], dim=-1)
    logp_other = F.log_softmax(other_BTV[scored_BT], dim=-1)
    ce = -logp_other.gather(1, targets_BT[scored_BT].unsqueeze(1)).squeeze(1)
    kl = (logp_clean.exp() * (logp_clean - logp_other)).sum(-1)
    return ce, kl


@torch.inference_mode()
def splice_metrics(
    model: nn.Module,
    point: HookPoint | int,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    tokens_CT: torch.Tensor,
    ordinary_CT: torch.Tensor,
    batch_size: int = 8,
) -> SpliceMetrics:
    """CE-loss recovered, delta LM loss and KL on the given contexts (see module docstring).

    ``point`` is the SAE's hook point (a block index: the residual stream after it);
    ``reconstruct`` maps the activations there at ordinary positions [N, D] to [N, D].
    """
    point = as_hook_point(point)

    def run(ids, ordinary, kind):
        if kind == "clean":
            return _logits(model, ids)
        replace = reconstruct if kind == "spliced" else torch.zeros_like
        return _logits(model, ids, point, _replacing(replace, ordinary))

    return three_run_metrics(run, tokens_CT, ordinary_CT, batch_size, next(model.parameters()).device)


RunLogits = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]
"""(ids [B, T], ordinary mask [B, T], "clean" | "spliced" | "zero") -> logits [B, T, V]."""


def three_run_metrics(
    run: RunLogits, tokens_CT: torch.Tensor, ordinary_CT: torch.Tensor, batch_size: int, device
) -> SpliceMetrics:
    """CE of the clean, spliced and zero runs and KL to the clean one, averaged over scored positions."""
    names = ("ce_clean", "ce_spliced", "ce_zero", "kl_spliced", "kl_zero")
    sums = dict.fromkeys(names, 0.0)
    n_scored = 0
    for start in range(0, tokens_CT.shape[0], batch_size):
        ids = tokens_CT[start : start + batch_size].to(device=device, dtype=torch.long)
        ordinary = ordinary_CT[start : start + batch_size].to(device)
        targets, scored = ids[:, 1:], ordinary[:, :-1] & ordinary[:, 1:]
        clean, spliced, zero = (run(ids, ordinary, kind)[:, :-1] for kind in ("clean", "spliced", "zero"))
        ce_clean, _ = token_ce_and_kl(clean, clean, targets, scored)
        ce_spliced, kl_spliced = token_ce_and_kl(clean, spliced, targets, scored)
        ce_zero, kl_zero = token_ce_and_kl(clean, zero, targets, scored)
        for key, values in zip(names, (ce_clean, ce_spliced, ce_zero, kl_spliced, kl_zero), strict=True):
            sums[key] += values.double().sum().item()
        n_scored += int(scored.sum())
    if n_scored == 0:
        raise ValueError("no scorable positions: every position is a special token")
    m = {key: value / n_scored for key, value in sums.items()}
    return SpliceMetrics(
        n_tokens=n_scored,
        ce_clean=m["ce_clean"],
        ce_spliced=m["ce_spliced"],
        ce_zero=m["ce_zero"],
        ce_loss_recovered=ce_loss_recovered(m["ce_clean"], m["ce_spliced"], m["ce_zero"]),
        delta_lm_loss=m["ce_spliced"] - m["ce_clean"],
        kl_spliced=m["kl_spliced"],
        kl_zero=m["kl_zero"],
    )
