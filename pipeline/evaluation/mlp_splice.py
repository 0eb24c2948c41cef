"""What the language model loses when transcoders replace the outputs of its MLPs.

Shape legend: B contexts, T positions, D d_model, V vocabulary.

For a set of layers S, the full model runs three times on each batch:
  clean   : untouched;
  spliced : the MLP output of every layer in S replaced by its transcoder's output,
            computed from that MLP's actual input in this (already spliced) run;
  zero    : the MLP output of every layer in S replaced by zeros (the baseline).
Special-token positions keep their clean MLP outputs. CE-loss recovered, delta LM
loss and KL are defined as in ``pipeline.evaluation.lm_loss``, over positions whose
input and target tokens are both ordinary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack

import torch
from torch import nn

from pipeline.evaluation.lm_loss import SpliceMetrics, three_run_metrics
from pipeline.lm.hook_points import replace_mlp_out

Replacement = Callable[[torch.Tensor], torch.Tensor]
"""MLP input [N, D] -> replacement MLP output [N, D]."""


def _splice(replace: Replacement, ordinary_BT: torch.Tensor):
    def splice(x_BTD: torch.Tensor, out_BTD: torch.Tensor) -> torch.Tensor:
        patched = out_BTD.clone()
        patched[ordinary_BT] = replace(x_BTD[ordinary_BT]).to(out_BTD.dtype)
        return patched

    return splice


def _logits(
    model: nn.Module, ids_BT: torch.Tensor, replacements: Mapping[int, Replacement], ordinary_BT
) -> torch.Tensor:
    with ExitStack() as stack:
        for layer, replace in replacements.items():
            stack.enter_context(replace_mlp_out(model, layer, _splice(replace, ordinary_BT)))
        return model(input_ids=ids_BT, use_cache=False).logits.float()


def _zeros(x_ND: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x_ND)


@torch.inference_mode()
def mlp_splice_metrics(
    model: nn.Module,
    replacements: Mapping[int, Replacement],
    tokens_CT: torch.Tensor,
    ordinary_CT: torch.Tensor,
    batch_size: int = 8,
) -> SpliceMetrics:
    """CE-loss recovered, delta LM loss and KL with every layer of ``replacements`` spliced at once."""
    if not replacements:
        raise ValueError("no layers to replace")
    chosen = {"clean": {}, "spliced": replacements, "zero": dict.fromkeys(replacements, _zeros)}

    def run(ids, ordinary, kind):
        return _logits(model, ids, chosen[kind], ordinary)

    return three_run_metrics(run, tokens_CT, ordinary_CT, batch_size, next(model.parameters()).device)
