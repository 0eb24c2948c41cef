"""The sparse autoencoder: one module, five architectures, no optimizer or I/O.

Shape legend: N tokens, D d_in, F latents (d_sae), K active latents per token.

    pre   = (x - b_dec) @ W_enc + b_enc                    [N, F]
    f     = act(pre)                                       sparse codes
    x_hat = f @ W_dec + b_dec                              [N, D]

``architecture`` picks ``act``:
  * ``topk``: keep the k largest pre-activations per token, ReLU them;
  * ``batchtopk`` (training only): keep the k*N largest over the whole batch;
    it runs inference as ``jumprelu`` with one learned global threshold;
  * ``relu``: ReLU (trained with an L1 penalty weighted by decoder norms);
  * ``jumprelu``: ``pre * (pre > threshold)`` with a per-latent threshold;
  * ``matryoshka`` (SAELens: matryoshka_batchtopk): BatchTopK codes over the whole
    dictionary, trained so that every prefix ``matryoshka_widths[m]`` of the latents
    reconstructs alone (``pipeline.sae.matryoshka``); runs inference as ``jumprelu``
    with the global threshold, like batchtopk, and keeps its widths.

TopK-style codes stay sparse end to end (``pipeline.sae.sparse_ops``): the decoder
never multiplies a dense [N, F] matrix. Weights follow the SAELens layout.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.sae.matryoshka import check_widths, default_widths, prefix_decode
from pipeline.sae.sparse_ops import encode_selected, sparse_decode

ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu", "matryoshka")
SPARSE_ARCHITECTURES = ("topk", "batchtopk", "matryoshka")
"""Trained on sparse (acts_NK, idx_NK) codes with AuxK."""
BATCH_ARCHITECTURES = ("batchtopk", "matryoshka")
"""Select k*N latents over the batch in training, then run with one global threshold."""


@dataclass(frozen=True)
class SaeConfig:
    """Shape and activation function of an SAE."""

    d_in: int
    """Width of the activations it reads."""
    d_sae: int
    """Number of latents."""
    architecture: str = "topk"
    """One of ARCHITECTURES."""
    k: int = 32
    """Active latents per token (topk) or mean per token over a batch (batchtopk)."""
    jumprelu_init_threshold: float = 0.001
    """Initial threshold of every JumpReLU latent (training units)."""
    jumprelu_bandwidth: float = 0.001
    """Width of the rectangle kernel of the straight-through estimator."""
    matryoshka_widths: tuple[int, ...] = ()
    """Nested prefix sizes, strictly increasing, ending at d_sae (matryoshka; kept by its jumprelu export).
    Empty for matryoshka: ``default_widths(d_sae)``."""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}: use one of {', '.join(ARCHITECTURES)}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in} and {self.d_sae}")
        if self.architecture in SPARSE_ARCHITECTURES and not 0 < self.k < self.d_sae:
            raise ValueError(f"k must be between 1 and d_sae - 1 = {self.d_sae - 1}, got {self.k}")
        if self.jumprelu_bandwidth <= 0 or self.jumprelu_init_threshold <= 0:
            raise ValueError("JumpReLU bandwidth and initial threshold must be positive")
        if self.matryoshka_widths:
            if self.architecture not in ("matryoshka", "jumprelu"):
                raise ValueError(f"matryoshka widths are for matryoshka SAEs, not {self.architecture}")
            try:
                check_widths(tuple(self.matryoshka_widths), self.d_sae)
            except ValueError as error:
                raise ValueError(f"matryoshka widths: {error}") from None

    @property
    def prefix_widths(self) -> tuple[int, ...]:
        """The matryoshka prefixes (defaults filled in); () for an SAE without them."""
        if self.matryoshka_widths:
            return tuple(self.matryoshka_widths)
        return default_widths(self.d_sae) if self.architecture == "matryoshka" else ()

    @property
    def uses_unit_norm_decoder(self) -> bool:
        """Whether decoder rows are kept at unit norm during training (all but relu)."""
        return self.architecture != "relu"


class SaeOutput(NamedTuple):
    """What one forward pass computed."""

    x_hat_ND: torch.Tensor
    """Reconstruction of the input."""
    acts_NK: torch.Tensor | None
    """Values of the active latents (topk, batchtopk); zero entries are padding."""
    idx_NK: torch.Tensor | None
    """Latent ids matching ``acts_NK``."""
    feats_NF: torch.Tensor | None
    """Dense codes (relu, jumprelu); None for the sparse architectures."""
    pre_NF: torch.Tensor
    """Pre-activations; detached for the sparse architectures."""
    prefix_x_hat_NMD: torch.Tensor | None = None
    """Reconstruction by each matryoshka prefix (training-mode matryoshka only); the last is ``x_hat_ND``."""

    def fired_F(self, n_latents: int) -> torch.Tensor:
        """Boolean [F]: which latents were active on at least one token."""
        if self.feats_NF is not None:
            return (self.feats_NF > 0).any(0)
        fired = torch.zeros(n_latents, dtype=torch.bool, device=self.x_hat_ND.device)
        fired[self.idx_NK[self.acts_NK > 0]] = True
        return fired

    def l0(self) -> torch.Tensor:
        """Mean number of active latents per token."""
        if self.feats_NF is not None:
            return (self.feats_NF > 0).float().sum(-1).mean()
        return (self.acts_NK > 0).float().sum(-1).mean()


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - t); gradient to t through a rectangle kernel of width eps (STE)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        grad_threshold = (-(threshold / eps) * in_window * grad).sum(0)
        return grad * (pre > threshold), grad_threshold, None


class _Step(torch.autograd.Function):
    """H(pre - t); gradient to t through the same rectangle kernel (for the L0 penalty)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        return None, (-(1.0 / eps) * in_window * grad).sum(0), None


def jumprelu_step(pre_NF: torch.Tensor, threshold_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Heaviside step H(pre - threshold) with a straight-through gradient to the threshold."""
    return _Step.apply(pre_NF, threshold_F, bandwidth)


def jumprelu(pre_NF: torch.Tensor, threshold_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """pre * H(pre - threshold) with a straight-through gradient to the threshold (rectangle kernel)."""
    return _JumpReLU.apply(pre_NF, threshold_F, bandwidth)


def batch_topk_select(pre_NF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents among the k*N largest positive pre-activations of the batch.

    Returns (idx_NK, keep_NK, cutoff): per token the candidate latents, a mask of
    the ones selected, and the smallest selected value. Exact: per-token candidate
    lists are widened until no token could have more selected latents than listed.
    """
    n_tokens, n_latents = pre_NF.shape
    total = k * n_tokens
    width = min(n_latents, 4 * k)
    while True:
        vals_NK, idx_NK = pre_NF.topk(width, dim=1, sorted=False)
        cutoff = vals_NK.reshape(-1).topk(total, sorted=False).values.min()
        keep_NK = (vals_NK >= cutoff) & (vals_NK > 0)
        saturated = bool(keep_NK.all(dim=1).any()) and width < n_latents
        if not saturated:
            return idx_NK, keep_NK, cutoff.clamp_min(0)
        width = min(n_latents, 2 * width)


class Sae(nn.Module):
    """A sparse autoencoder with SAELens-layout weights (see module docstring)."""

    def __init__(self, cfg: SaeConfig, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        d, f = cfg.d_in, cfg.d_sae
        self.W_enc_FD = nn.Parameter(torch.zeros(f, d, device=device))
        self.b_enc = nn.Parameter(torch.zeros(f, device=device))
        self.W_dec = nn.Parameter(torch.zeros(f, d, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device))
        if cfg.architecture == "jumprelu":
            initial = math.log(cfg.jumprelu_init_threshold)
            self.log_threshold = nn.Parameter(torch.full((f,), initial, device=device))
        if cfg.architecture in BATCH_ARCHITECTURES:
            self.register_buffer("batch_threshold", torch.zeros((), device=device))

    @torch.no_grad()
    def initialize(self, generator: torch.Generator, decoder_norm: float = 1.0, encoder_scale: float = 1.0) -> Sae:
        """Random decoder rows of norm ``decoder_norm``, W_enc = encoder_scale * W_dec^T, biases zero."""
        W_FD = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator)
        W_FD = W_FD / W_FD.norm(dim=1, keepdim=True) * decoder_norm
        self.W_dec.copy_(W_FD)
        self.W_enc_FD.copy_(W_FD * encoder_scale)
        self.b_enc.zero_()
        self.b_dec.zero_()
        return self

    @property
    def W_enc(self) -> torch.Tensor:
        """The encoder in SAELens layout [D, F] (a view of ``W_enc_FD``, held transposed for speed)."""
        return self.W_enc_FD.t()

    @property
    def threshold(self) -> torch.Tensor:
        """Per-latent JumpReLU threshold [F] (jumprelu: learned; batchtopk: the global estimate)."""
        if self.cfg.architecture == "jumprelu":
            return self.log_threshold.exp()
        if self.cfg.architecture in BATCH_ARCHITECTURES:
            return self.batch_threshold.expand(self.cfg.d_sae)
        raise AttributeError(f"a {self.cfg.architecture} SAE has no threshold")

    @property
    def input_offset(self) -> torch.Tensor:
        """What the encoder subtracts from its input: b_dec (a transcoder subtracts nothing)."""
        return self.b_dec

    def skip(self, x_ND: torch.Tensor) -> torch.Tensor | None:
        """A linear path from input to output added to the reconstruction (None: there is none)."""
        return None

    def _with_skip(self, x_hat_ND: torch.Tensor, x_ND: torch.Tensor) -> torch.Tensor:
        skip_ND = self.skip(x_ND)
        return x_hat_ND if skip_ND is None else x_hat_ND + skip_ND

    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        """(x - input_offset) @ W_enc + b_enc, with autograd [..., F] (any leading shape)."""
        return F.linear(x_ND - self.input_offset, self.W_enc_FD, self.b_enc)

    def _topk_forward(self, x_ND: torch.Tensor) -> SaeOutput:
        with torch.no_grad():
            pre_NF = torch.addmm(self.b_enc, x_ND - self.input_offset, self.W_enc_FD.t())
            if self.training and self.cfg.architecture in BATCH_ARCHITECTURES:
                idx_NK, keep_NK, cutoff = batch_topk_select(pre_NF, self.cfg.k)
                self._update_batch_threshold(cutoff)
            else:
                idx_NK = pre_NF.topk(self.cfg.k, dim=1, sorted=False).indices
                keep_NK = None
        acts_NK = torch.relu(encode_selected(x_ND, self.input_offset, self.W_enc_FD, self.b_enc, idx_NK, pre_NF))
        if keep_NK is not None:
            acts_NK = acts_NK * keep_NK
        if self.cfg.architecture == "matryoshka":
            prefix_x_hat = prefix_decode(acts_NK, idx_NK, self.W_dec, self.cfg.prefix_widths) + self.b_dec
            return SaeOutput(prefix_x_hat[:, -1], acts_NK, idx_NK, None, pre_NF, prefix_x_hat)
        x_hat = self._with_skip(sparse_decode(acts_NK, idx_NK, self.W_dec) + self.b_dec, x_ND)
        return SaeOutput(x_hat, acts_NK, idx_NK, None, pre_NF)

    @torch.no_grad()
    def _update_batch_threshold(self, cutoff: torch.Tensor, decay: float = 0.99) -> None:
        if self.batch_threshold.item() == 0:
            self.batch_threshold.copy_(cutoff)
        else:
            self.batch_threshold.mul_(decay).add_((1 - decay) * cutoff)

    def _dense_forward(self, x_ND: torch.Tensor) -> SaeOutput:
        pre_NF = self.pre_acts(x_ND)
        feats_NF = self.activation(pre_NF)
        x_hat = self._with_skip(feats_NF @ self.W_dec + self.b_dec, x_ND)
        return SaeOutput(x_hat, None, None, feats_NF, pre_NF)

    def activation(self, pre_NF: torch.Tensor) -> torch.Tensor:
        """Dense codes from pre-activations, for any architecture (inference semantics)."""
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(pre_NF)
        if arch == "jumprelu":
            return _JumpReLU.apply(pre_NF, self.threshold, self.cfg.jumprelu_bandwidth)
        if arch in BATCH_ARCHITECTURES:
            return pre_NF * (pre_NF > self.threshold)
        vals, idx = pre_NF.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_NF).scatter(-1, idx, torch.relu(vals))

    def forward(self, x_ND: torch.Tensor) -> SaeOutput:
        """Encode and decode; training-mode BatchTopK (and matryoshka) selects over the batch."""
        if self.cfg.architecture == "topk" or (self.cfg.architecture in BATCH_ARCHITECTURES and self.training):
            return self._topk_forward(x_ND)
        return self._dense_forward(x_ND)

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Dense codes [N, F] with inference semantics."""
        return self.activation(self.pre_acts(x_ND))

    def decode(self, feats_NF: torch.Tensor) -> torch.Tensor:
        """Reconstruction [N, D] from dense codes."""
        return feats_NF @ self.W_dec + self.b_dec

    @torch.no_grad()
    def encode_sparse(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Active latents as (acts_NK, idx_NK), zero-padded; K = k for topk, else the most active in the batch."""
        pre_NF = self.pre_acts(x_ND)
        if self.cfg.architecture == "topk":
            vals, idx = pre_NF.topk(self.cfg.k, dim=1, sorted=False)
            return torch.relu(vals), idx
        feats_NF = self.activation(pre_NF)
        width = max(1, int((feats_NF > 0).sum(1).max()))
        vals, idx = feats_NF.topk(width, dim=1, sorted=False)
        return vals, idx

    def decode_sparse(self, acts_NK: torch.Tensor, idx_NK: torch.Tensor) -> torch.Tensor:
        """Reconstruction [N, D] from sparse codes, without forming [N, F]."""
        return sparse_decode(acts_NK, idx_NK, self.W_dec) + self.b_dec

    @torch.no_grad()
    def reconstruct(self, x_ND: torch.Tensor) -> torch.Tensor:
        """x_hat with inference semantics (sparse decode where codes are sparse; plus any skip path)."""
        return self._with_skip(self.decode_sparse(*self.encode_sparse(x_ND)), x_ND)


def export_sae(sae: Sae, input_scale: float) -> Sae:
    """An inference copy that takes raw activations: folds the input scale into the weights.

    Trained on ``s * x``: pre(s x) = s x W - b_dec W + b_enc. The copy keeps W_enc and the
    unit-norm W_dec and divides b_enc, b_dec and thresholds by ``s``, so its codes are
    ``f / s`` (raw activation units) and its reconstruction is ``x_hat / s``. A BatchTopK
    or Matryoshka SAE becomes a JumpReLU SAE with its global threshold on every latent
    (a Matryoshka one keeps its prefix widths).
    """
    cfg = sae.cfg
    arch = "jumprelu" if cfg.architecture in BATCH_ARCHITECTURES else cfg.architecture
    shape = SaeConfig(cfg.d_in, cfg.d_sae, arch, cfg.k, cfg.jumprelu_init_threshold, cfg.jumprelu_bandwidth)
    exported = Sae(dataclasses.replace(shape, matryoshka_widths=cfg.prefix_widths))
    exported = exported.to(sae.W_dec.device)
    with torch.no_grad():
        exported.W_enc_FD.copy_(sae.W_enc_FD)
        exported.W_dec.copy_(sae.W_dec)
        exported.b_enc.copy_(sae.b_enc / input_scale)
        exported.b_dec.copy_(sae.b_dec / input_scale)
        if arch == "jumprelu":
            exported.log_threshold.copy_(torch.log(sae.threshold.float() / input_scale))
    return exported.eval()
