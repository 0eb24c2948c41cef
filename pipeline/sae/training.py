"""Train SAEs on an iterator of activation batches: a pure step, a short loop, two callbacks.

Shape legend: N tokens, D d_in, F latents, K active latents.

The trainer never sees a language model or a file path. Inputs arrive already
multiplied by the normalization factor. Per architecture the loss is
  * topk / batchtopk: MSE + auxk_coef * AuxK (Gao et al. 2024): the residual is
    reconstructed from the top ``d_in / 2`` pre-activations of dead latents;
  * relu: MSE + l1 * sum_i f_i * ||W_dec[i]|| (coefficient warmed up linearly);
  * jumprelu: MSE + l0 * sum_i H(pre_i - threshold_i), straight-through gradients;
  * matryoshka: sum over prefixes m of MSE(x, x_hat_m) + auxk_coef * AuxK, where x_hat_m
    decodes only the BatchTopK latents below ``matryoshka_widths[m]`` (the last prefix is
    the whole SAE, so its term is the plain MSE); a sum, as in Bussmann et al. 2025 and SAELens.
MSE is the squared error summed over dimensions, averaged over tokens. Decoder
rows are kept at unit norm (the gradient's parallel component removed before
each step, rows renormalized after) for all but relu.

``train_many`` feeds one batch stream to several SAEs (a grid), each taking
exactly the steps ``train_sae`` would give it alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pipeline.runtime.distributed import SINGLE, Group
from pipeline.sae.auxk import auxk_loss
from pipeline.sae.model import BATCH_ARCHITECTURES, SPARSE_ARCHITECTURES, Sae, SaeOutput, jumprelu_step
from pipeline.sae.optimizers import ScheduleFreeSignum
from pipeline.sae.schedule import linear_warmup, lr_at

OPTIMIZERS = ("adam", "signum-sf")
"""Choices of ``TrainConfig.optimizer``."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings (all resolved: no "auto" left)."""

    total_steps: int
    """Optimizer steps to take."""
    lr: float
    """Peak learning rate (of Adam, or of the schedule-free signum's z step)."""
    optimizer: str = "signum-sf"
    """One of ``OPTIMIZERS``: "signum-sf" (schedule-free signum, pipeline.sae.optimizers: warm-up, then
    constant, no decay; evaluate and export through ``eval_weights``) or "adam" (warm-up, constant,
    linear decay)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up."""
    decay_fraction: float = 0.2
    """Linear decay to zero over this last fraction of the steps."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    sf_momentum: float = 0.9
    """Schedule-free interpolation beta (signum-sf): y = (1 - beta) z + beta x."""
    sf_average_power: float = 2.0
    """Schedule-free averaging weight t^r lr_t^2 of iterate t (signum-sf); r > 0 favours later iterates."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss (topk, batchtopk)."""
    auxk_dead_tokens: int = 10_000_000
    """A latent silent for this many training tokens counts as dead for AuxK."""
    l1_coef: float = 5.0
    """ReLU sparsity penalty, applied to f_i * ||W_dec[i]||."""
    l1_warmup_steps: int = 0
    """Steps over which the L1 coefficient ramps up from 0."""
    l0_coef: float = 0.05
    """JumpReLU sparsity penalty on the number of active latents."""
    compute_dtype: torch.dtype = torch.float32
    """Autocast dtype of the forward pass; master weights stay float32."""
    log_every: int = 25
    """Call on_log every this many steps (and at the last step)."""
    checkpoint_every: int = 0
    """Call on_checkpoint every this many steps (0: never)."""

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {self.total_steps}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs."""

    tokens_since_fired_F: torch.Tensor
    """Training tokens since each latent last fired."""
    step: int = 0
    tokens_seen: int = 0

    @classmethod
    def fresh(cls, d_sae: int, device: torch.device | str = "cpu") -> TrainState:
        return cls(tokens_since_fired_F=torch.zeros(d_sae, dtype=torch.int64, device=device))

    def dead_fraction(self, window_tokens: int) -> float:
        """Fraction of latents that have not fired in the last ``window_tokens`` tokens."""
        return (self.tokens_since_fired_F >= window_tokens).float().mean().item()


class StepStats(NamedTuple):
    """Scalars of one training step."""

    step: int
    loss: float
    mse: float
    fvu: float
    """Batch FVU: sum ||x - x_hat||^2 / sum ||x - batch mean||^2."""
    l0: float
    aux_loss: float
    lr: float


def make_optimizer(sae: Sae, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over float32 master weights.

    adam: the fused kernel (about 4x faster on CPU). signum-sf: schedule-free signum
    with the decoder's z rows kept at unit norm where the SAE's decoder is.
    """
    if cfg.optimizer == "signum-sf":
        decoder = [sae.W_dec]
        rest = [p for p in sae.parameters() if p is not sae.W_dec]
        groups = [{"params": rest}, {"params": decoder, "unit_rows": sae.cfg.uses_unit_norm_decoder}]
        return ScheduleFreeSignum(groups, lr=cfg.lr, momentum=cfg.sf_momentum, average_power=cfg.sf_average_power)
    return torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, fused=True)


def step_lr(cfg: TrainConfig, step: int) -> float:
    """The learning rate of ``step``: schedule-free signum takes no decay (its average plays that part)."""
    decay = 0.0 if cfg.optimizer == "signum-sf" else cfg.decay_fraction
    return lr_at(step, cfg.total_steps, cfg.lr, cfg.warmup_steps, decay)


DEAD_WINDOW_CAP = 10_000_000
"""Gao et al. (2024): a latent silent for 10M tokens is dead."""


def default_auxk_dead_tokens(tokens: int, batch_size: int) -> int:
    """AuxK's dead window: 10M tokens, or a tenth of a shorter run (at least one batch) so it still revives."""
    return max(batch_size, min(DEAD_WINDOW_CAP, tokens // 10))


def sparsity_penalty(sae: Sae, out: SaeOutput, cfg: TrainConfig, step: int, n_tokens: int) -> torch.Tensor:
    """The relu L1 or jumprelu L0 term summed over this batch's tokens / ``n_tokens`` (0 for topk-style SAEs)."""
    arch = sae.cfg.architecture
    if arch == "relu":
        coef = linear_warmup(step, cfg.l1_warmup_steps, cfg.l1_coef)
        return coef * (out.feats_NF * sae.W_dec.norm(dim=1)).sum() / n_tokens
    if arch == "jumprelu":
        active = jumprelu_step(out.pre_NF, sae.threshold, sae.cfg.jumprelu_bandwidth)
        return cfg.l0_coef * active.sum() / n_tokens
    return out.x_hat_ND.new_zeros(())


def inner_prefix_mse(out: SaeOutput, x_ND: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Matryoshka: the squared errors of every prefix but the last, summed, / ``n_tokens`` (0 for other SAEs)."""
    if out.prefix_x_hat_NMD is None:
        return x_ND.new_zeros(())
    inner_NMD = out.prefix_x_hat_NMD[:, :-1].float()
    return (inner_NMD - x_ND[:, None]).pow(2).sum() / n_tokens


@torch.no_grad()
def remove_parallel_decoder_grad(sae: Sae) -> None:
    """Project out the component of each decoder row's gradient along that row (unit-norm rows)."""
    if sae.W_dec.grad is None:
        return
    W, G = sae.W_dec, sae.W_dec.grad
    G.addcmul_(W, torch.linalg.vecdot(G, W, dim=1).unsqueeze(1), value=-1)


@torch.no_grad()
def normalize_decoder(sae: Sae) -> None:
    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


class BatchMoments(NamedTuple):
    """Whole-batch sums (over every rank's slice) that the loss and the batch FVU need."""

    n_tokens: int
    data_variance: torch.Tensor
    """sum ||x - mean x||^2 over the batch."""
    residual_variance: torch.Tensor
    """sum ||r - mean r||^2 of the residual r = x - x_hat."""


def _centered_sum_of_squares(sum_D: torch.Tensor, sum_sq: torch.Tensor, n: int) -> torch.Tensor:
    return (sum_sq - sum_D.pow(2).sum() / n).clamp_min(0).float()


def batch_moments(x_ND: torch.Tensor, x_hat_ND: torch.Tensor, group: Group) -> BatchMoments:
    """Counts and variances of the whole batch in one collective (float64 sums: exact enough to centre)."""
    if not group.distributed:
        residual_ND = (x_ND - x_hat_ND).detach().float()
        return BatchMoments(
            x_ND.shape[0],
            (x_ND - x_ND.mean(0)).pow(2).sum(),
            (residual_ND - residual_ND.mean(0)).pow(2).sum(),
        )
    x64, r64 = x_ND.double(), (x_ND - x_hat_ND).detach().double()
    count = x64.new_tensor([x_ND.shape[0]])
    packed = torch.cat([count, x64.sum(0), x64.pow(2).sum().view(1), r64.sum(0), r64.pow(2).sum().view(1)])
    group.sum_(packed)
    d = x_ND.shape[1]
    n = int(packed[0].item())
    x_sum, x_sq, r_sum, r_sq = packed[1 : d + 1], packed[d + 1], packed[d + 2 : 2 * d + 2], packed[2 * d + 2]
    return BatchMoments(n, _centered_sum_of_squares(x_sum, x_sq, n), _centered_sum_of_squares(r_sum, r_sq, n))


def _all_reduce_gradients(sae: Sae, group: Group) -> None:
    """Sum every gradient over ranks (each rank's loss is its share of the whole batch's loss)."""
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    group.sum_(*grads)


def train_step(
    sae: Sae,
    optimizer: torch.optim.Optimizer,
    x_ND: torch.Tensor,
    state: TrainState,
    cfg: TrainConfig,
    group: Group = SINGLE,
    target_ND: torch.Tensor | None = None,
) -> StepStats:
    """One optimizer step on one batch; updates ``state`` (step, tokens, dead counters) in place.

    The SAE reconstructs ``x_ND`` itself, or ``target_ND`` when given (a transcoder
    reads an MLP's input and reconstructs its output).

    Under several ranks ``x_ND`` is this rank's slice of the batch: every loss term
    is a sum over the slice divided by whole-batch quantities, gradients are summed
    over ranks, and the dead counters and statistics are reduced, so every rank
    takes the same step that one process would take on the whole batch.
    """
    lr = step_lr(cfg, state.step)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    device_type = x_ND.device.type
    use_autocast = cfg.compute_dtype != torch.float32
    with torch.autocast(device_type, dtype=cfg.compute_dtype, enabled=use_autocast):
        out = sae(x_ND)
        y_ND = x_ND if target_ND is None else target_ND
        moments = batch_moments(y_ND, out.x_hat_ND.float(), group)
        error_ND = (out.x_hat_ND.float() - y_ND).pow(2)
        mse = error_ND.sum() / moments.n_tokens
        aux = x_ND.new_zeros(())
        if sae.cfg.architecture in SPARSE_ARCHITECTURES:
            dead_F = state.tokens_since_fired_F >= cfg.auxk_dead_tokens
            aux = auxk_loss(sae, x_ND, out, dead_F, moments.residual_variance, target_ND)
        loss = mse + inner_prefix_mse(out, y_ND, moments.n_tokens) + cfg.auxk_coef * aux
        loss = loss + sparsity_penalty(sae, out, cfg, state.step, moments.n_tokens)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    _all_reduce_gradients(sae, group)
    if sae.cfg.uses_unit_norm_decoder:
        remove_parallel_decoder_grad(sae)
    optimizer.step()
    if sae.cfg.uses_unit_norm_decoder:
        normalize_decoder(sae)
    return _after_step(sae, out, state, moments, group, (loss, mse, aux, error_ND.sum()), lr)


@torch.no_grad()
def _after_step(
    sae: Sae, out: SaeOutput, state: TrainState, moments: BatchMoments, group: Group, terms, lr
) -> StepStats:
    """Reduce the dead counters and the step's scalars over ranks; advance ``state``."""
    fired_F = out.fired_F(sae.cfg.d_sae)
    l0_sum = out.l0() * out.pre_NF.shape[0]
    scalars = torch.stack([t.detach().float() for t in (*terms, l0_sum)])
    if group.distributed:
        packed = torch.cat([fired_F.float(), scalars])
        group.sum_(packed)
        fired_F, scalars = packed[: sae.cfg.d_sae] > 0, packed[sae.cfg.d_sae :]
        if sae.cfg.architecture in BATCH_ARCHITECTURES:  # the running threshold: the mean of the ranks' estimates
            group.sum_(sae.batch_threshold)
            sae.batch_threshold.div_(group.world)
    state.tokens_since_fired_F += moments.n_tokens
    state.tokens_since_fired_F[fired_F] = 0
    state.step += 1
    state.tokens_seen += moments.n_tokens
    loss, mse, aux, error_sum, l0_sum = scalars.tolist()
    fvu = error_sum / max(float(moments.data_variance), 1e-12)
    return StepStats(state.step, loss, mse, fvu, l0_sum / moments.n_tokens, aux, lr)


@dataclass
class TrainResult:
    """Where training ended."""

    state: TrainState
    last: StepStats | None


def train_sae(
    sae: Sae,
    batches: Iterator[torch.Tensor],
    cfg: TrainConfig,
    state: TrainState | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_log: Callable[[StepStats, TrainState], None] | None = None,
    on_checkpoint: Callable[[TrainState, torch.optim.Optimizer], None] | None = None,
    group: Group = SINGLE,
) -> TrainResult:
    """Run ``train_step`` until ``cfg.total_steps`` (resuming from ``state``) or the batches run out."""
    state = state or TrainState.fresh(sae.cfg.d_sae, sae.W_dec.device)
    trainee = Trainee(sae, optimizer or make_optimizer(sae, cfg), state, cfg, on_log, on_checkpoint)
    train_many([trainee], batches, first_batch=state.step, group=group)
    return TrainResult(state=trainee.state, last=trainee.last)


@dataclass
class Trainee:
    """One SAE fed by ``train_many``: its weights, optimizer, state, settings and callbacks."""

    sae: Sae
    optimizer: torch.optim.Optimizer
    state: TrainState
    cfg: TrainConfig
    on_log: Callable[[StepStats, TrainState], None] | None = None
    """Called every ``cfg.log_every`` steps and at the last one."""
    on_checkpoint: Callable[[TrainState, torch.optim.Optimizer], None] | None = None
    """Called every ``cfg.checkpoint_every`` steps and at the last one."""
    pick: Callable[[object], tuple[torch.Tensor, torch.Tensor | None]] | None = None
    """This trainee's (input, target) in a shared batch (None: the batch is its input)."""
    last: StepStats | None = None
    """Statistics of the latest step taken."""

    @property
    def done(self) -> bool:
        return self.state.step >= self.cfg.total_steps


def advance(trainee: Trainee, batch, group: Group = SINGLE) -> StepStats:
    """One ``train_step`` of ``trainee``, then the log and checkpoint callbacks that fall due."""
    state, cfg = trainee.state, trainee.cfg
    x_ND, target_ND = trainee.pick(batch) if trainee.pick else (batch, None)
    trainee.last = train_step(trainee.sae, trainee.optimizer, x_ND, state, cfg, group, target_ND)
    is_last = state.step == cfg.total_steps
    if trainee.on_log and (state.step % cfg.log_every == 0 or is_last):
        trainee.on_log(trainee.last, state)
    if trainee.on_checkpoint and cfg.checkpoint_every and (state.step % cfg.checkpoint_every == 0 or is_last):
        trainee.on_checkpoint(state, trainee.optimizer)
    return trainee.last


def train_many(
    trainees: list[Trainee],
    batches: Iterator[torch.Tensor],
    first_batch: int = 0,
    group: Group = SINGLE,
    chunk: int = 1,
) -> None:
    """Feed one stream of batches to several SAEs, each exactly as ``train_sae`` alone would.

    ``batches`` yields batch number ``first_batch`` first. A trainee at step s takes
    batch s, so one resumed from a later checkpoint than the others skips the
    batches it has already trained on. ``chunk`` batches are held at once and each
    trainee takes its steps on all of them before the next trainee: the same steps
    in the same order, with one SAE's weights hot in the CPU caches for a while
    (measured: round-robin after every batch made 6 SAEs' steps 31% slower). Batch
    tensors are shared: ``train_step`` never writes into its input. Stops when every
    trainee is done or the batches run out.
    """
    behind = [t.state.step for t in trainees if t.state.step < first_batch]
    if behind:
        raise ValueError(f"a trainee is at step {behind[0]}, before the first batch {first_batch}")
    for trainee in trainees:
        trainee.sae.train()
    index = first_batch
    while not all(t.done for t in trainees):
        block = list(itertools.islice(batches, chunk))
        if not block:
            break
        for trainee in trainees:
            for offset, x_ND in enumerate(block):
                if trainee.state.step == index + offset and not trainee.done:
                    advance(trainee, x_ND, group)
        index += len(block)
    for trainee in trainees:
        trainee.sae.eval()


def checkpoint_tree(key: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer, train: dict) -> dict:
    """Everything a resumed run needs, as a tree of tensors and scalars (no file format): the module's weights
    under ``key``, the optimizer, the ``train`` counters and the torch RNG."""
    return {key: module.state_dict(), "optimizer": optimizer.state_dict(), "train": train,
            "rng": {"torch": torch.get_rng_state()}}  # fmt: skip


def restore_checkpoint_tree(tree: dict, key: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load ``checkpoint_tree`` output back into ``module``, ``optimizer`` and the RNG; return its ``train``."""
    module.load_state_dict(tree[key])
    optimizer.load_state_dict(tree["optimizer"])
    torch.set_rng_state(tree["rng"]["torch"])
    return tree["train"]


def state_tree(sae: Sae, optimizer: torch.optim.Optimizer, state: TrainState) -> dict:
    """An SAE run's ``checkpoint_tree``."""
    train = {"step": state.step, "tokens_seen": state.tokens_seen, "tokens_since_fired_F": state.tokens_since_fired_F}
    return checkpoint_tree("sae", sae, optimizer, train)


def restore_state_tree(tree: dict, sae: Sae, optimizer: torch.optim.Optimizer) -> TrainState:
    """Load ``state_tree`` output back into ``sae`` and ``optimizer``; return the TrainState."""
    train = restore_checkpoint_tree(tree, "sae", sae, optimizer)
    return TrainState(
        tokens_since_fired_F=train["tokens_since_fired_F"].to(sae.W_dec.device),
        step=int(train["step"]),
        tokens_seen=int(train["tokens_seen"]),
    )
