"""All layers' TopK transcoders as one stacked model: one batched step instead of one step per layer.

Shape legend: L layers, N tokens, D d_model, F latents, K active latents per token.

``StackedTranscoders`` holds every layer's weights stacked on a leading layer axis
(``W_enc_LFD``, ``b_enc_LF``, ``W_dec_LFD``, ``b_dec_LD``, ``W_skip_LDD``) and
``stacked_step`` takes, for all layers at once, exactly the step that
``pipeline.sae.training.train_step`` takes for each layer alone: the same loss
(MSE + auxk_coef * AuxK per layer, summed over layers, whose gradients do not mix
because no weight is shared), the same decoder-norm constraint and the same
optimizer update. The work is a handful of large operations instead of ~30 small
ones per layer: one batched encoder GEMM (``baddbmm``), one top-k, one sparse decode
and one CSR weight gradient over all layers' latents (global latent ids
``l * F + f``), one batched skip GEMM, one optimizer call over five stacked
tensors. AuxK runs batched too: each layer's dead latents compete for the top
``k_aux`` slots of a masked pre-activation, layers with fewer dead latents keep
only theirs, and layers with none contribute zero.

The per-layer ``train_step`` is the eager twin (tests/test_transcoder_speed.py
holds weights, optimizer state and counters equal after several steps).
``stack_members`` / ``unstack_members`` convert to and from per-layer
(Transcoder, optimizer, TrainState) triples, so checkpoints keep the per-layer
format and a run can resume on either path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.sae.model import SaeConfig
from pipeline.sae.sparse_ops import sparse_transpose_matmul
from pipeline.sae.training import StepStats, TrainConfig, TrainState, make_optimizer, step_lr
from pipeline.sae.transcoder import Transcoder

PARAMETER_NAMES = ("W_enc_FD", "b_enc", "W_dec", "b_dec", "W_skip")
"""Per-layer Transcoder parameters, in ``Transcoder.parameters()`` order (optimizer state follows it)."""


def stackable(cfg: SaeConfig, skip: bool) -> str | None:
    """Why a transcoder set cannot take the stacked path (None: it can)."""
    if cfg.architecture != "topk":
        return f"the stacked path trains topk transcoders, not {cfg.architecture}"
    if not skip:
        return "the stacked path trains skip transcoders"
    return None


class StackedTranscoders(nn.Module):
    """L skip transcoders (TopK) with their weights stacked on a leading layer axis."""

    def __init__(self, cfg: SaeConfig, n_layers: int, device: torch.device | str | None = None):
        super().__init__()
        reason = stackable(cfg, skip=True)
        if reason:
            raise ValueError(reason)
        self.cfg, self.n_layers = cfg, n_layers
        L, D, Fn = n_layers, cfg.d_in, cfg.d_sae
        # names and order match Transcoder's parameters, so per-layer optimizer state maps 1:1
        self.W_enc_FD = nn.Parameter(torch.zeros(L, Fn, D, device=device))
        self.b_enc = nn.Parameter(torch.zeros(L, Fn, device=device))
        self.W_dec = nn.Parameter(torch.zeros(L, Fn, D, device=device))
        self.b_dec = nn.Parameter(torch.zeros(L, D, device=device))
        self.W_skip = nn.Parameter(torch.zeros(L, D, D, device=device))


class _EncodeSelectedStacked(torch.autograd.Function):
    """pre[l, n, idx[l, n, k]] with a backward that touches only the L*N*K selected entries.

    Transcoders subtract nothing from their input, so the weight gradient is one CSR
    product over global latent ids and the bias gradient one ``index_add``.
    """

    @staticmethod
    def forward(ctx, x_LND, W_LFD, b_LF, idx_LNK, pre_LNF):
        ctx.save_for_backward(x_LND, W_LFD, idx_LNK)
        return pre_LNF.gather(2, idx_LNK)

    @staticmethod
    def backward(ctx, grad_LNK):
        x_LND, W_LFD, idx_LNK = ctx.saved_tensors
        L, Fn, D = W_LFD.shape
        work = torch.promote_types(grad_LNK.dtype, torch.float32)
        grad_NK = grad_LNK.to(work).reshape(-1, idx_LNK.shape[2])
        global_NK = _global_ids(idx_LNK, Fn).reshape(-1, idx_LNK.shape[2])
        grad_b = torch.zeros(L * Fn, dtype=work, device=grad_NK.device)
        grad_b.index_add_(0, global_NK.reshape(-1), grad_NK.reshape(-1))
        grad_W = sparse_transpose_matmul(grad_NK, global_NK, x_LND.reshape(-1, D).to(work), L * Fn)
        return None, grad_W.view(L, Fn, D).to(W_LFD.dtype), grad_b.view(L, Fn).to(W_LFD.dtype), None, None


def _global_ids(idx_LNK: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Latent ids l * F + f, indexing the layer-flattened [L * F, ...] weights."""
    offsets_L = torch.arange(idx_LNK.shape[0], device=idx_LNK.device) * n_latents
    return idx_LNK + offsets_L.view(-1, 1, 1)


def _decode(acts_LNK: torch.Tensor, idx_LNK: torch.Tensor, W_LFD: torch.Tensor) -> torch.Tensor:
    """sum_k acts[l, n, k] * W[l, idx[l, n, k]] -> [L, N, D], one embedding_bag over all layers."""
    L, N, K = idx_LNK.shape
    Fn, D = W_LFD.shape[1:]
    flat = F.embedding_bag(
        _global_ids(idx_LNK, Fn).reshape(L * N, K),
        W_LFD.reshape(L * Fn, D),
        per_sample_weights=acts_LNK.reshape(L * N, K).to(W_LFD.dtype),
        mode="sum",
    )
    return flat.view(L, N, D)


class StackedOutput(NamedTuple):
    """What the stacked forward computed (``SaeOutput``'s fields for the topk case, stacked over layers)."""

    y_hat_LND: torch.Tensor
    """Reconstruction of each layer's target (sparse decode + b_dec + skip)."""
    acts_LNK: torch.Tensor
    """Values of the active latents (ReLU of the selected pre-activations)."""
    idx_LNK: torch.Tensor
    """Per-layer latent ids matching ``acts_LNK``."""
    pre_LNF: torch.Tensor
    """Pre-activations in the compute dtype, detached."""


def stacked_forward(tcs: StackedTranscoders, x_LND: torch.Tensor, dtype: torch.dtype) -> StackedOutput:
    """Every layer's TopK transcoder on its input, the products in ``dtype`` where it is a half type (as
    ``train_step``'s autocast: otherwise in the weights' own dtype)."""
    if dtype not in (torch.bfloat16, torch.float16):
        dtype = x_LND.dtype
    x_c = x_LND.to(dtype)
    with torch.no_grad():
        W_enc_c = tcs.W_enc_FD.detach().to(dtype)
        pre_LNF = torch.baddbmm(tcs.b_enc.detach().to(dtype).unsqueeze(1), x_c, W_enc_c.transpose(1, 2))
        idx_LNK = pre_LNF.topk(tcs.cfg.k, dim=2, sorted=False).indices
    acts_LNK = torch.relu(_EncodeSelectedStacked.apply(x_LND, tcs.W_enc_FD, tcs.b_enc, idx_LNK, pre_LNF))
    decoded_LND = _decode(acts_LNK, idx_LNK, tcs.W_dec)
    skip_LND = torch.bmm(x_c, tcs.W_skip.to(dtype).transpose(1, 2))
    y_hat_LND = decoded_LND + tcs.b_dec.unsqueeze(1) + skip_LND
    return StackedOutput(y_hat_LND, acts_LNK, idx_LNK, pre_LNF)


def stacked_auxk(
    tcs: StackedTranscoders, x_LND: torch.Tensor, out: StackedOutput, error_LND: torch.Tensor, dead_LF: torch.Tensor
) -> torch.Tensor:
    """Every layer's AuxK loss [L] (``pipeline.sae.auxk.auxk_loss``), 0 where a layer has no dead latent.

    ``error_LND`` is y_hat - y, detached: the residual AuxK reconstructs is its negative.

    k_aux = min(D / 2, dead latents of the layer); all layers select the top
    min(D / 2, most dead latents of any layer) of their pre-activations masked to
    dead latents, and a layer keeps only the selected latents that are dead.
    """
    n_dead_L = dead_LF.sum(1)
    most = int(n_dead_L.max())
    if most == 0:
        return x_LND.new_zeros(x_LND.shape[0])
    k_aux = min(tcs.cfg.d_in // 2, most)
    with torch.no_grad():
        masked_LNF = out.pre_LNF.masked_fill(~dead_LF.unsqueeze(1), float("-inf"))
        idx_LNK = masked_LNF.topk(k_aux, dim=2, sorted=False).indices
        keep_LNK = dead_LF.gather(1, idx_LNK.flatten(1)).view_as(idx_LNK)
    pre_LNK = _EncodeSelectedStacked.apply(x_LND, tcs.W_enc_FD, tcs.b_enc, idx_LNK, out.pre_LNF)
    acts_LNK = torch.relu(pre_LNK) * keep_LNK
    e_hat_LND = _decode(acts_LNK, idx_LNK, tcs.W_dec).float()
    variance_L = _centered_sum_of_squares_L(error_LND)
    loss_L = (e_hat_LND + error_LND).pow(2).sum((1, 2)) / variance_L.clamp_min(1e-12)
    return torch.where(n_dead_L > 0, loss_L, torch.zeros_like(loss_L))


@dataclass
class StackedState:
    """Per-layer TrainState fields, stacked (every layer is at the same step)."""

    tokens_since_fired_LF: torch.Tensor
    step: int = 0
    tokens_seen: int = 0


def _centered_sum_of_squares_L(v_LND: torch.Tensor) -> torch.Tensor:
    """sum over n, d of (v - mean_n v)^2, per layer [L] (one pass)."""
    return v_LND.var(dim=1, correction=0).sum(1) * v_LND.shape[1]


def stacked_step(
    tcs: StackedTranscoders,
    optimizer: torch.optim.Optimizer,
    x_LND: torch.Tensor,
    y_LND: torch.Tensor,
    state: StackedState,
    cfg: TrainConfig,
) -> list[StepStats]:
    """One optimizer step of every layer on its (input, target) pair; updates ``state``; per-layer stats."""
    lr = step_lr(cfg, state.step)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    n_tokens = x_LND.shape[1]
    out = stacked_forward(tcs, x_LND, cfg.compute_dtype)
    error_LND = out.y_hat_LND.float() - y_LND  # .float() as train_step: the loss is never below float32
    mse_L = error_LND.pow(2).sum((1, 2)) / n_tokens
    dead_LF = state.tokens_since_fired_LF >= cfg.auxk_dead_tokens
    aux_L = stacked_auxk(tcs, x_LND, out, error_LND.detach(), dead_LF)
    loss_L = mse_L + cfg.auxk_coef * aux_L
    optimizer.zero_grad(set_to_none=True)
    loss_L.sum().backward()
    with torch.no_grad():
        G, W = tcs.W_dec.grad, tcs.W_dec
        G.addcmul_(W, torch.linalg.vecdot(G, W, dim=-1).unsqueeze(-1), value=-1)
    optimizer.step()
    with torch.no_grad():
        tcs.W_dec.div_(tcs.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
    return _after_stacked_step(out, y_LND, state, (loss_L, mse_L, aux_L), lr)


@torch.no_grad()
def _after_stacked_step(out: StackedOutput, y_LND, state: StackedState, terms, lr: float) -> list[StepStats]:
    L, N, _ = out.idx_LNK.shape
    active_LNK = out.acts_LNK > 0
    fired_LF = torch.zeros_like(state.tokens_since_fired_LF, dtype=torch.bool)
    fired_LF.view(-1)[_global_ids(out.idx_LNK, fired_LF.shape[1])[active_LNK]] = True
    state.tokens_since_fired_LF += N
    state.tokens_since_fired_LF[fired_LF] = 0
    state.step += 1
    state.tokens_seen += N
    loss_L, mse_L, aux_L = terms
    error_sum_L = mse_L * N
    fvu_L = error_sum_L / _centered_sum_of_squares_L(y_LND).clamp_min(1e-12)
    l0_L = active_LNK.sum((1, 2)).float() / N
    rows = torch.stack([t.detach().float() for t in (loss_L, mse_L, fvu_L, l0_L, aux_L)], 1).tolist()
    return [StepStats(state.step, loss, mse, fvu, l0, aux, lr) for loss, mse, fvu, l0, aux in rows]


def make_stacked_optimizer(tcs: StackedTranscoders, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``make_optimizer`` over the stacked weights (element-wise optimizers: the same update per layer)."""
    return make_optimizer(tcs, cfg)


def stack_members(members: list[tuple[Transcoder, torch.optim.Optimizer, TrainState]], cfg: TrainConfig):
    """Per-layer (transcoder, optimizer, state) triples -> (StackedTranscoders, optimizer, StackedState).

    Every layer must be at the same step (they are, when written by either path).
    """
    steps = {state.step for _, _, state in members}
    if len(steps) != 1:
        raise ValueError(f"the layers are at different steps {sorted(steps)}: the stacked path needs one step")
    first_tc = members[0][0]
    tcs = StackedTranscoders(first_tc.cfg, len(members)).to(first_tc.W_dec.device, first_tc.W_dec.dtype)
    with torch.no_grad():
        for name in PARAMETER_NAMES:
            getattr(tcs, name).copy_(torch.stack([getattr(tc, name).detach() for tc, _, _ in members]))
    optimizer = make_stacked_optimizer(tcs, cfg)
    dicts = [opt.state_dict() for _, opt, _ in members]
    stacked = dicts[0]
    stacked["state"] = {
        index: {key: _stack_entry([d["state"][index][key] for d in dicts]) for key in entry}
        for index, entry in dicts[0]["state"].items()
    }
    optimizer.load_state_dict(stacked)
    state = StackedState(
        torch.stack([s.tokens_since_fired_F for _, _, s in members]),
        members[0][2].step,
        members[0][2].tokens_seen,
    )
    return tcs, optimizer, state


def _stack_entry(values: list):
    if isinstance(values[0], torch.Tensor) and values[0].dim() > 0:
        return torch.stack(values)
    return values[0]  # a step count: the same in every layer


def unstack_members(tcs: StackedTranscoders, optimizer: torch.optim.Optimizer, state: StackedState, cfg: TrainConfig):
    """The inverse of ``stack_members``: a list of per-layer (Transcoder, optimizer, TrainState) copies."""
    full = optimizer.state_dict()
    members = []
    for layer in range(tcs.n_layers):
        tc = Transcoder(tcs.cfg).to(tcs.W_dec.device, tcs.W_dec.dtype)
        with torch.no_grad():
            for name in PARAMETER_NAMES:
                getattr(tc, name).copy_(getattr(tcs, name)[layer])
        opt = make_optimizer(tc, cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.load_state_dict(
                {
                    "state": {
                        index: {key: _layer_entry(value, layer) for key, value in entry.items()}
                        for index, entry in full["state"].items()
                    },
                    "param_groups": full["param_groups"],
                }
            )
        members.append((tc, opt, TrainState(state.tokens_since_fired_LF[layer].clone(), state.step, state.tokens_seen)))
    return members


def _layer_entry(value, layer: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return value[layer].clone()
    return value.clone() if isinstance(value, torch.Tensor) else value
