"""Train a cross-layer transcoder on batches of every layer's (MLP input, MLP output): a pure step, a short loop.

Shape legend: L layers, N tokens, D d_model, F latents per layer, K active latents, X = (L - l) * D.

Each batch is a dict layer -> (x_ND, y_ND) for every layer, one live read of the model
(``train_clt`` stacks it into x_LND, y_LND and multiplies each layer by its normalization
factors ``s_in[l]``, ``s_out[l]``: E||s x|| = sqrt(D) on the first batch, as the
per-layer transcoders are normalized; see ``layer_scales``). Loss:

    sum over output layers l' of MSE(y_hat_l', y_l')           (squared error summed over D, mean over tokens)
  + auxk_coef * sum over source layers l of AuxK_l              (topk, batchtopk)
  + l0_coef * sum over layers of mean active latents per token  (jumprelu)

AuxK_l (Gao et al. 2024, B.1) reconstructs the residual of every output layer l writes,
y[l:] - y_hat[l:], from the top min(D/2, n_dead) pre-activations of layer l's dead
latents, normalized by that residual's variance. Each feature's decoder row (its writes
into all its output layers, ``CrossLayerTranscoder.W_dec[l]``) is kept at unit norm:
the gradient's parallel component removed before the step, rows renormalized after.
The optimizers are the per-layer transcoders' (``training.TrainConfig.optimizer``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pipeline.sae.cross_layer import TRAINABLE_CLT_ARCHITECTURES, CltOutput, CrossLayerTranscoder
from pipeline.sae.initialization import normalization_factor
from pipeline.sae.model import jumprelu_step
from pipeline.sae.optimizers import ScheduleFreeSignum
from pipeline.sae.sparse_ops import encode_selected, sparse_matmul
from pipeline.sae.training import TrainConfig, checkpoint_tree, restore_checkpoint_tree, step_lr

Batch = Mapping[int, tuple[torch.Tensor, torch.Tensor]]
"""layer -> (mlp-in [N, D], mlp-out [N, D]) for every layer of the CLT."""


@dataclass
class CltTrainState:
    """Everything besides weights and optimizer that a resumed run needs."""

    tokens_since_fired_LF: torch.Tensor
    """Training tokens since each latent of each layer last fired."""
    step: int = 0
    tokens_seen: int = 0

    @classmethod
    def fresh(cls, clt: CrossLayerTranscoder) -> CltTrainState:
        shape = (clt.cfg.n_layers, clt.cfg.d_sae)
        return cls(tokens_since_fired_LF=torch.zeros(shape, dtype=torch.int64, device=clt.b_dec_LD.device))

    def dead_fraction(self, window_tokens: int) -> float:
        """Fraction of latents (all layers) silent for the last ``window_tokens`` tokens."""
        return (self.tokens_since_fired_LF >= window_tokens).float().mean().item()


class CltStepStats(NamedTuple):
    """Scalars of one training step."""

    step: int
    loss: float
    mse: float
    """Squared error summed over layers and dimensions, mean over tokens."""
    fvu: float
    """sum over layers ||y - y_hat||^2 / sum over layers ||y - batch mean||^2."""
    l0: float
    """Mean active latents per token and layer."""
    aux_loss: float
    lr: float


def layer_scales(batch: Batch, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_in [L], s_out [L]): each layer's input and output normalization factors on ``batch``."""
    s_in = [normalization_factor(batch[layer][0]) for layer in range(n_layers)]
    s_out = [normalization_factor(batch[layer][1]) for layer in range(n_layers)]
    return torch.tensor(s_in), torch.tensor(s_out)


def stack_batch(batch: Batch, n_layers: int, scales=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_LND, y_LND) from a dict batch, each layer multiplied by its scales when given."""
    missing = [layer for layer in range(n_layers) if layer not in batch]
    if missing:
        raise ValueError(f"a CLT batch needs every layer 0..{n_layers - 1}: missing {missing}")
    x_LND = torch.stack([batch[layer][0] for layer in range(n_layers)]).float()
    y_LND = torch.stack([batch[layer][1] for layer in range(n_layers)]).float()
    if scales is not None:
        s_in, s_out = (s.to(x_LND.device, x_LND.dtype)[:, None, None] for s in scales)
        x_LND, y_LND = x_LND * s_in, y_LND * s_out
    return x_LND, y_LND


def make_clt_optimizer(clt: CrossLayerTranscoder, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over the CLT: schedule-free signum keeps every decoder row's z at unit norm."""
    decoders = list(clt.W_dec)
    rest = [p for p in clt.parameters() if all(p is not d for d in decoders)]
    if cfg.optimizer == "signum-sf":
        groups = [{"params": rest}, {"params": decoders, "unit_rows": True}]
        return ScheduleFreeSignum(groups, lr=cfg.lr, momentum=cfg.sf_momentum, average_power=cfg.sf_average_power)
    return torch.optim.Adam(clt.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, fused=True)


@torch.no_grad()
def remove_parallel_decoder_grad(clt: CrossLayerTranscoder) -> None:
    """Project out of each decoder row's gradient its component along the (unit) row."""
    for W in clt.W_dec:
        if W.grad is not None:
            W.grad.addcmul_(W, torch.linalg.vecdot(W.grad, W, dim=1).unsqueeze(1), value=-1)


@torch.no_grad()
def normalize_decoder(clt: CrossLayerTranscoder) -> None:
    """Every decoder row (a feature's writes into all its output layers) back to unit norm."""
    for W in clt.W_dec:
        W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-8))


def _centered_sum_of_squares(v_NX: torch.Tensor) -> torch.Tensor:
    return (v_NX - v_NX.mean(0)).pow(2).sum()


def clt_auxk_loss(clt: CrossLayerTranscoder, x_LND, y_LND, out: CltOutput, dead_LF: torch.Tensor) -> torch.Tensor:
    """Sum over source layers of AuxK_l (module docstring); 0 where no latent is dead. Sparse kernels only."""
    L, D = clt.cfg.n_layers, clt.cfg.d_model
    total = x_LND.new_zeros(())
    for layer in range(L):
        dead_ids = dead_LF[layer].nonzero().squeeze(1)
        if dead_ids.numel() == 0:
            continue
        k_aux = min(D // 2, dead_ids.numel())
        pre_NF = out.pre[layer].detach()
        idx_NK = dead_ids[pre_NF[:, dead_ids].topk(k_aux, dim=1, sorted=False).indices]
        W_FD, b_F = clt.W_enc[layer], clt.b_enc_LF[layer]
        acts_NK = torch.relu(encode_selected(x_LND[layer], x_LND.new_zeros(D), W_FD, b_F, idx_NK, pre_NF))
        e_hat_NX = sparse_matmul(acts_NK, idx_NK, clt.W_dec[layer]).float()
        residual_NX = (y_LND[layer:] - out.y_hat_LND[layer:]).detach().float().transpose(0, 1).reshape(len(pre_NF), -1)
        scale = min(dead_ids.numel() / k_aux, 1.0)
        variance = _centered_sum_of_squares(residual_NX).clamp_min(1e-12)
        total = total + scale * (e_hat_NX - residual_NX).pow(2).sum() / variance
    return total


def _l0_penalty(clt: CrossLayerTranscoder, out: CltOutput, cfg: TrainConfig, n_tokens: int) -> torch.Tensor:
    if clt.cfg.architecture != "jumprelu":
        return out.y_hat_LND.new_zeros(())
    bandwidth = clt.cfg.jumprelu_bandwidth
    active = [jumprelu_step(pre_NF, clt.threshold(layer), bandwidth).sum() for layer, pre_NF in enumerate(out.pre)]
    return cfg.l0_coef * torch.stack(active).sum() / n_tokens


def clt_train_step(
    clt: CrossLayerTranscoder,
    optimizer: torch.optim.Optimizer,
    x_LND: torch.Tensor,
    y_LND: torch.Tensor,
    state: CltTrainState,
    cfg: TrainConfig,
) -> CltStepStats:
    """One optimizer step on one normalized batch; updates ``state`` (step, tokens, dead counters) in place."""
    lr = step_lr(cfg, state.step)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    use_autocast = cfg.compute_dtype != torch.float32
    with torch.autocast(x_LND.device.type, dtype=cfg.compute_dtype, enabled=use_autocast):
        out = clt(x_LND)
        n_tokens = x_LND.shape[1]
        error_sum = (out.y_hat_LND.float() - y_LND).pow(2).sum()
        mse = error_sum / n_tokens
        aux = x_LND.new_zeros(())
        if clt.cfg.architecture in ("topk", "batchtopk"):
            aux = clt_auxk_loss(clt, x_LND, y_LND, out, state.tokens_since_fired_LF >= cfg.auxk_dead_tokens)
        loss = mse + cfg.auxk_coef * aux + _l0_penalty(clt, out, cfg, n_tokens)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    remove_parallel_decoder_grad(clt)
    optimizer.step()
    normalize_decoder(clt)
    return _after_step(clt, out, state, y_LND, (loss, mse, aux, error_sum), lr)


@torch.no_grad()
def _after_step(clt, out: CltOutput, state: CltTrainState, y_LND, terms, lr) -> CltStepStats:
    n_tokens = y_LND.shape[1]
    state.tokens_since_fired_LF += n_tokens
    for layer, (acts_NK, idx_NK) in enumerate(zip(out.acts, out.idx, strict=True)):
        state.tokens_since_fired_LF[layer, idx_NK[acts_NK > 0]] = 0
    state.step += 1
    state.tokens_seen += n_tokens
    loss, mse, aux, error_sum = (float(t) for t in terms)
    variance = float((y_LND - y_LND.mean(1, keepdim=True)).pow(2).sum())
    return CltStepStats(state.step, loss, mse, error_sum / max(variance, 1e-12), float(out.l0()), aux, lr)


@dataclass
class CltTrainResult:
    """Where training ended."""

    state: CltTrainState
    last: CltStepStats | None


def train_clt(
    clt: CrossLayerTranscoder,
    batches: Iterator[Batch],
    cfg: TrainConfig,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    state: CltTrainState | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_log: Callable[[CltStepStats, CltTrainState], None] | None = None,
    on_checkpoint: Callable[[CltTrainState, torch.optim.Optimizer], None] | None = None,
) -> CltTrainResult:
    """Run ``clt_train_step`` until ``cfg.total_steps`` (resuming from ``state``) or the batches run out.

    ``batches`` yields the batch of step ``state.step`` first (a resumed run's iterator starts
    where the checkpoint stopped). ``scales`` = (s_in [L], s_out [L]) multiplies each layer
    (``layer_scales`` on the first batch); None: the batches arrive normalized.
    """
    if clt.cfg.architecture not in TRAINABLE_CLT_ARCHITECTURES:
        raise ValueError(
            f"a {clt.cfg.architecture} CLT cannot be trained here (no sparsity penalty): "
            f"use one of {', '.join(TRAINABLE_CLT_ARCHITECTURES)}"
        )
    state = state or CltTrainState.fresh(clt)
    optimizer = optimizer or make_clt_optimizer(clt, cfg)
    last = None
    clt.train()
    while state.step < cfg.total_steps:
        batch = next(batches, None)
        if batch is None:
            break
        x_LND, y_LND = stack_batch(batch, clt.cfg.n_layers, scales)
        device = clt.b_dec_LD.device
        last = clt_train_step(clt, optimizer, x_LND.to(device), y_LND.to(device), state, cfg)
        is_last = state.step == cfg.total_steps
        if on_log and (state.step % cfg.log_every == 0 or is_last):
            on_log(last, state)
        if on_checkpoint and cfg.checkpoint_every and (state.step % cfg.checkpoint_every == 0 or is_last):
            on_checkpoint(state, optimizer)
    clt.eval()
    return CltTrainResult(state, last)


def clt_state_tree(clt: CrossLayerTranscoder, optimizer: torch.optim.Optimizer, state: CltTrainState) -> dict:
    """A CLT run's ``checkpoint_tree``."""
    train = {"step": state.step, "tokens_seen": state.tokens_seen, "tokens_since_fired_LF": state.tokens_since_fired_LF}
    return checkpoint_tree("clt", clt, optimizer, train)


def restore_clt_state_tree(tree: dict, clt: CrossLayerTranscoder, optimizer: torch.optim.Optimizer) -> CltTrainState:
    """Load ``clt_state_tree`` output back into ``clt`` and ``optimizer``; return the state."""
    train = restore_checkpoint_tree(tree, "clt", clt, optimizer)
    return CltTrainState(
        tokens_since_fired_LF=train["tokens_since_fired_LF"].to(clt.b_dec_LD.device),
        step=int(train["step"]),
        tokens_seen=int(train["tokens_seen"]),
    )


@contextmanager
def clt_eval_weights(clt: CrossLayerTranscoder, optimizer: torch.optim.Optimizer):
    """``clt`` holding the weights to evaluate and export, restored to the training weights after.

    Adam: the parameters themselves. Schedule-free: the x sequence, with decoder rows
    renormalized to unit norm and each row's norm folded into its encoder row, bias and
    (jumprelu) threshold, so every selected latent writes exactly what it did before the fold.
    """
    if not isinstance(optimizer, ScheduleFreeSignum):
        yield clt
        return
    params = list(clt.parameters())
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.copy_(optimizer.eval_point(p))
            for layer, W in enumerate(clt.W_dec):
                norms_F = W.norm(dim=1).clamp_min(1e-8)
                W.div_(norms_F[:, None])
                clt.W_enc[layer].mul_(norms_F[:, None])
                clt.b_enc_LF[layer].mul_(norms_F)
                if clt.cfg.architecture == "jumprelu":
                    clt.log_threshold_LF[layer].add_(norms_F.log())
        yield clt
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
