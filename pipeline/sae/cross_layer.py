"""Cross-layer transcoders (CLTs): one encoder per layer, decoders into that layer's MLP output and every later one.

Shape legend: L layers, N tokens, D d_model, F latents per layer, K active latents per token,
X = (L - l) * D (the outputs a source layer l writes, concatenated).

For layers l = 0..L-1, with x_l the MLP input (mlp-in) of layer l and y_l its MLP output (mlp-out):

    pre_l    = x_l @ W_enc[l] + b_enc[l]                                   [N, F]
    f_l      = act(pre_l)                                                  sparse codes
    y_hat_l' = b_dec[l'] + sum_{l <= l'} f_l @ W_dec[l][:, l' - l, :]      [N, D]
               (+ x_l' @ W_skip[l']^T with the optional skip path)

(Ameisen et al. 2025, "Circuit Tracing"). ``act`` is one of ``CLT_ARCHITECTURES``, per layer:
``topk`` (the k largest pre-activations per token), ``batchtopk`` (the k*N largest of the
layer over the batch in training; inference as jumprelu with one learned global threshold
per layer), ``jumprelu`` (per-latent threshold) or ``relu`` (inference only: what
circuit-tracer calls a CLT without thresholds; ``train_clt`` refuses it, having no L1 penalty).

Decoder layout: source layer l holds ``W_dec[l]`` as one [F, (L - l) * D] matrix, a
contiguous view of circuit-tracer's [F, L - l, D] (``decoder(l)``). A feature's writes
into all its output layers are one row, so (a) the sparse decode of a source layer is one
``embedding_bag`` over all its outputs (L calls per step, not L(L+1)/2), and (b) the row
is what training keeps at unit norm (the feature's whole decoder, as the per-layer
transcoders keep theirs), which the schedule-free optimizer's ``unit_rows`` does as is.
Codes stay sparse end to end: the decoder never multiplies a dense [N, F] matrix.

Memory (``training_bytes``): the decoders hold F * D * L(L+1)/2 weights. For
SmolLM2-135M (L=30, D=576), float32 master weights, their gradients, two optimizer
tensors per weight (Adam: m, v; schedule-free signum: z, x), one more copy (the
schedule-free step's sign temporary, or the evaluation swap), and the activations of a
1024-token batch (measured at 2304: peak resident 13.5 GiB, ``bench/clt_step.py``):

    F per layer   decoder params   all params   training bytes
    1152 (2x)     0.31 B           0.33 B       ~6.6 GiB
    2304 (4x)     0.62 B           0.66 B       ~13.0 GiB
    4608 (8x)     1.23 B           1.31 B       ~25.8 GiB

``DEFAULT_EXPANSION`` = 4 (F = 2304 on SmolLM2): the widest that fits 24 GiB with over
40% headroom; 8x does not fit 24 GiB in float32.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.sae.model import SaeConfig, batch_topk_select, jumprelu
from pipeline.sae.sparse_ops import encode_selected, sparse_matmul

CLT_ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")
TRAINABLE_CLT_ARCHITECTURES = ("topk", "batchtopk", "jumprelu")
DEFAULT_EXPANSION = 4
"""F = 4 * d_model latents per layer (see the memory table in the module docstring)."""


@dataclass(frozen=True)
class CltConfig:
    """Shape and activation function of a cross-layer transcoder."""

    n_layers: int
    """Layers it spans (L): every layer of the model, from 0."""
    d_model: int
    """Width of the MLP inputs and outputs it reads and writes (D)."""
    d_sae: int
    """Latents per layer (F)."""
    architecture: str = "topk"
    """One of ``CLT_ARCHITECTURES``, the same for every layer."""
    k: int = 32
    """Active latents per token and layer (topk), or their mean over a batch (batchtopk)."""
    jumprelu_init_threshold: float = 0.001
    """Initial threshold of every JumpReLU latent (training units)."""
    jumprelu_bandwidth: float = 0.001
    """Width of the rectangle kernel of the straight-through estimator."""
    skip: bool = False
    """Add a learned linear skip path x_l @ W_skip[l]^T to each layer's output."""

    def __post_init__(self):
        if self.architecture not in CLT_ARCHITECTURES:
            raise ValueError(
                f"unknown cross-layer transcoder architecture {self.architecture!r}: "
                f"use one of {', '.join(CLT_ARCHITECTURES)}"
            )
        if min(self.n_layers, self.d_model, self.d_sae) < 1:
            raise ValueError(
                f"n_layers, d_model and d_sae must be positive, got {self.n_layers}, {self.d_model}, {self.d_sae}"
            )
        if self.architecture in ("topk", "batchtopk") and not 0 < self.k < self.d_sae:
            raise ValueError(f"k must be between 1 and d_sae - 1 = {self.d_sae - 1}, got {self.k}")
        if self.jumprelu_bandwidth <= 0 or self.jumprelu_init_threshold <= 0:
            raise ValueError("JumpReLU bandwidth and initial threshold must be positive")

    def layer_config(self) -> SaeConfig:
        """One layer's encoder as an ``SaeConfig`` (what code written for per-layer transcoders reads)."""
        return SaeConfig(
            self.d_model, self.d_sae, self.architecture, self.k, self.jumprelu_init_threshold, self.jumprelu_bandwidth
        )

    def activate(self, pre_NF: torch.Tensor, threshold_F: torch.Tensor | None) -> torch.Tensor:
        """Dense codes from one layer's pre-activations, inference semantics (``threshold_F``: jumprelu/batchtopk)."""
        if self.architecture == "topk":
            vals, top = pre_NF.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre_NF).scatter(-1, top, torch.relu(vals))
        if self.architecture == "relu":
            return torch.relu(pre_NF)
        return pre_NF * (pre_NF > threshold_F)


class CltOutput(NamedTuple):
    """What one forward pass computed; codes are per source layer, sparse."""

    y_hat_LND: torch.Tensor
    """Reconstruction of every layer's MLP output."""
    acts: tuple[torch.Tensor, ...]
    """Per layer [N, K_l]: values of the selected latents (zero entries are padding)."""
    idx: tuple[torch.Tensor, ...]
    """Per layer [N, K_l]: latent ids matching ``acts``."""
    pre: tuple[torch.Tensor, ...]
    """Per layer [N, F] pre-activations (with autograd for jumprelu, detached otherwise)."""

    def l0(self) -> torch.Tensor:
        """Mean active latents per token and layer."""
        return torch.stack([(a > 0).float().sum(-1).mean() for a in self.acts]).mean()


def decoder_parameters(n_layers: int, d_model: int, d_sae: int) -> int:
    """F * D * L(L+1)/2: the decoder weights of a CLT."""
    return d_sae * d_model * n_layers * (n_layers + 1) // 2


def training_bytes(n_layers: int, d_model: int, d_sae: int, batch: int = 1024, skip: bool = False) -> int:
    """Bytes to train a CLT in float32: weights, gradients, two optimizer tensors, one temporary copy, activations.

    Activations: x and y [L, N, D], the reconstruction and its gradient, and the [L, N, F]
    pre-activations (held for selection and AuxK).
    """
    weights = decoder_parameters(n_layers, d_model, d_sae) + n_layers * (d_sae * d_model + d_sae + d_model)
    weights += n_layers * d_model * d_model if skip else 0
    activations = n_layers * batch * (4 * d_model + 2 * d_sae)
    return 4 * (5 * weights + activations)


class _ShiftedSum(torch.autograd.Function):
    """y[:, l'] = sum over sources s <= l' of writes[s][:, l' - s]  ->  [N, L, D].

    The gradient of each source's [N, L - s, D] block is a view of y's gradient. (Summed
    through autograd slicing instead, every (source, output) pair's backward fills a zero
    tensor of the whole block: ~15 s of a 45 s CPU step at L=30, F=2304.)
    """

    @staticmethod
    def forward(ctx, *writes):
        ctx.n_layers = len(writes)
        y_NLD = writes[0].new_zeros(writes[0].shape[0], len(writes), writes[0].shape[2])
        for source, write_NOD in enumerate(writes):
            y_NLD[:, source:] += write_NOD
        return y_NLD

    @staticmethod
    def backward(ctx, grad_NLD):
        return tuple(grad_NLD[:, source:] for source in range(ctx.n_layers))


class CrossLayerTranscoder(nn.Module):
    """The CLT of the module docstring; parameters in training units, inputs already normalized."""

    def __init__(self, cfg: CltConfig, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        L, D, Fl = cfg.n_layers, cfg.d_model, cfg.d_sae
        self.W_enc = nn.ParameterList([nn.Parameter(torch.zeros(Fl, D, device=device)) for _ in range(L)])
        """Per layer [F, D] (held transposed, as ``Sae.W_enc_FD``)."""
        self.b_enc_LF = nn.Parameter(torch.zeros(L, Fl, device=device))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.zeros(Fl, (L - layer) * D, device=device)) for layer in range(L)]
        )
        """Per source layer l [F, (L - l) * D]; see ``decoder``."""
        self.b_dec_LD = nn.Parameter(torch.zeros(L, D, device=device))
        skips = [nn.Parameter(torch.zeros(D, D, device=device)) for _ in range(L)] if cfg.skip else []
        self.W_skip = nn.ParameterList(skips)
        """Per layer [D_out, D_in] when ``cfg.skip`` (empty otherwise)."""
        if cfg.architecture == "jumprelu":
            initial = math.log(cfg.jumprelu_init_threshold)
            self.log_threshold_LF = nn.Parameter(torch.full((L, Fl), initial, device=device))
        if cfg.architecture == "batchtopk":
            self.register_buffer("batch_threshold_L", torch.zeros(L, device=device))

    @torch.no_grad()
    def initialize(self, generator: torch.Generator, encoder_scale: float = 1.0) -> CrossLayerTranscoder:
        """Decoder rows random of unit norm (over all outputs); encoder rows random of norm ``encoder_scale``."""
        for W_enc, W_dec in zip(self.W_enc, self.W_dec, strict=True):
            W = torch.randn(W_dec.shape, generator=generator)
            W_dec.copy_(W / W.norm(dim=1, keepdim=True))
            E = torch.randn(W_enc.shape, generator=generator)
            W_enc.copy_(E / E.norm(dim=1, keepdim=True) * encoder_scale)
        self.b_enc_LF.zero_()
        self.b_dec_LD.zero_()
        for W_skip in self.W_skip:
            W_skip.zero_()
        return self

    def decoder(self, layer: int) -> torch.Tensor:
        """Source layer ``layer``'s decoders [F, L - layer, D] (circuit-tracer's layout; a view)."""
        return self.W_dec[layer].view(self.cfg.d_sae, self.cfg.n_layers - layer, self.cfg.d_model)

    def threshold(self, layer: int) -> torch.Tensor:
        """Per-latent JumpReLU threshold [F] of ``layer`` (jumprelu: learned; batchtopk: the global estimate)."""
        if self.cfg.architecture == "jumprelu":
            return self.log_threshold_LF[layer].exp()
        if self.cfg.architecture == "batchtopk":
            return self.batch_threshold_L[layer].expand(self.cfg.d_sae)
        raise AttributeError(f"a {self.cfg.architecture} CLT has no threshold")

    def layer_threshold(self, layer: int) -> torch.Tensor | None:
        """``threshold(layer)``, or None for an architecture without one (topk, relu)."""
        return self.threshold(layer) if self.cfg.architecture in ("jumprelu", "batchtopk") else None

    def pre_acts(self, layer: int, x_ND: torch.Tensor) -> torch.Tensor:
        """x @ W_enc[layer] + b_enc[layer], with autograd [..., F]."""
        return F.linear(x_ND, self.W_enc[layer], self.b_enc_LF[layer])

    def _select_topk(self, layer: int, x_ND: torch.Tensor):
        """TopK (and training-mode BatchTopK) codes with the sparse encoder backward."""
        W_FD, b_F = self.W_enc[layer], self.b_enc_LF[layer]
        with torch.no_grad():
            pre_NF = torch.addmm(b_F, x_ND, W_FD.t())
            if self.cfg.architecture == "batchtopk":
                idx_NK, keep_NK, cutoff = batch_topk_select(pre_NF, self.cfg.k)
                self._update_batch_threshold(layer, cutoff)
            else:
                idx_NK, keep_NK = pre_NF.topk(self.cfg.k, dim=1, sorted=False).indices, None
        no_offset_D = x_ND.new_zeros(x_ND.shape[1])
        acts_NK = torch.relu(encode_selected(x_ND, no_offset_D, W_FD, b_F, idx_NK, pre_NF))
        return (acts_NK if keep_NK is None else acts_NK * keep_NK), idx_NK, pre_NF

    def _select_threshold(self, layer: int, x_ND: torch.Tensor):
        """JumpReLU codes (or inference BatchTopK), gathered to the most active latents of the batch's busiest token."""
        pre_NF = self.pre_acts(layer, x_ND)
        if self.cfg.architecture == "jumprelu":
            feats_NF = jumprelu(pre_NF, self.threshold(layer), self.cfg.jumprelu_bandwidth)
        else:
            feats_NF = self.cfg.activate(pre_NF, self.layer_threshold(layer))
        width = max(1, int((feats_NF > 0).sum(1).max()))
        idx_NK = feats_NF.detach().topk(width, dim=1, sorted=False).indices
        return feats_NF.gather(1, idx_NK), idx_NK, pre_NF

    @torch.no_grad()
    def _update_batch_threshold(self, layer: int, cutoff: torch.Tensor, decay: float = 0.99) -> None:
        current = self.batch_threshold_L[layer]
        self.batch_threshold_L[layer] = cutoff if current.item() == 0 else decay * current + (1 - decay) * cutoff

    def select(self, layer: int, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(acts_NK, idx_NK, pre_NF) of one layer; training-mode BatchTopK selects over the batch."""
        if self.cfg.architecture == "topk" or (self.cfg.architecture == "batchtopk" and self.training):
            return self._select_topk(layer, x_ND)
        return self._select_threshold(layer, x_ND)

    def skip(self, x_LND: torch.Tensor) -> torch.Tensor | None:
        """x_l @ W_skip[l]^T for every layer [L, N, D], or None without a skip path."""
        if not self.cfg.skip:
            return None
        return torch.stack([F.linear(x_ND, W) for x_ND, W in zip(x_LND, self.W_skip, strict=True)])

    def decode_sparse(self, acts, idx, x_LND: torch.Tensor | None = None) -> torch.Tensor:
        """y_hat [L, N, D] from per-layer sparse codes (one ``embedding_bag`` per source layer).

        ``x_LND`` (the MLP inputs) is needed only with a skip path.
        """
        L, D = self.cfg.n_layers, self.cfg.d_model
        writes = [
            sparse_matmul(a_NK, i_NK, W).view(a_NK.shape[0], L - source, D)
            for source, (a_NK, i_NK, W) in enumerate(zip(acts, idx, self.W_dec, strict=True))
        ]
        y_hat_LND = _ShiftedSum.apply(*writes).transpose(0, 1) + self.b_dec_LD[:, None]
        return self._plus_skip(y_hat_LND, x_LND)

    def _plus_skip(self, y_hat_LND: torch.Tensor, x_LND: torch.Tensor | None) -> torch.Tensor:
        if not self.cfg.skip:
            return y_hat_LND
        if x_LND is None:
            raise ValueError("this CLT has a skip path: pass the MLP inputs x_LND to decode")
        return y_hat_LND + self.skip(x_LND)

    def forward(self, x_LND: torch.Tensor) -> CltOutput:
        """Encode every layer's MLP input and decode every layer's MLP output (training semantics in train mode)."""
        self._check_input(x_LND)
        acts, idx, pre = zip(*(self.select(layer, x_ND) for layer, x_ND in enumerate(x_LND)), strict=True)
        return CltOutput(self.decode_sparse(acts, idx, x_LND), acts, idx, pre)

    def _check_input(self, x_LND: torch.Tensor) -> None:
        L, D = self.cfg.n_layers, self.cfg.d_model
        if x_LND.ndim != 3 or x_LND.shape[0] != L or x_LND.shape[2] != D:
            raise ValueError(f"a CLT over {L} layers of width {D} reads [L={L}, N, D={D}], got {tuple(x_LND.shape)}")

    def encode(self, x_LND: torch.Tensor) -> torch.Tensor:
        """Dense codes [L, N, F] with inference semantics."""
        self._check_input(x_LND)
        codes = []
        for layer, x_ND in enumerate(x_LND):
            codes.append(self.cfg.activate(self.pre_acts(layer, x_ND), self.layer_threshold(layer)))
        return torch.stack(codes)

    def decode(self, acts_LNF: torch.Tensor, x_LND: torch.Tensor | None = None) -> torch.Tensor:
        """y_hat [L, N, D] from dense codes, by the formula (the eager twin of ``decode_sparse``)."""
        rows = []
        for out in range(self.cfg.n_layers):
            y_ND = self.b_dec_LD[out].expand(acts_LNF.shape[1], -1)
            for source in range(out + 1):
                y_ND = y_ND + acts_LNF[source] @ self.decoder(source)[:, out - source]
            rows.append(y_ND)
        return self._plus_skip(torch.stack(rows), x_LND)

    @torch.no_grad()
    def reconstruct(self, x_LND: torch.Tensor) -> torch.Tensor:
        """y_hat with inference semantics (sparse decode)."""
        was_training = self.training
        self.eval()
        try:
            out = self(x_LND)
        finally:
            self.train(was_training)
        return out.y_hat_LND

    def layer_view(self, layer: int) -> CltLayer:
        """Layer ``layer`` as the tracer sees a per-layer transcoder (see ``CltLayer``)."""
        return CltLayer(self, layer)


@dataclass(frozen=True)
class CltLayer:
    """Layer l of a CLT in the shape of one layer's transcoder: its encoder, the decoder bias and skip of
    output layer l, ``W_dec`` = what its features write into layer l itself, and ``decoder_rows`` /
    ``output_layers``: what they write into every output layer (the replacement model reads these)."""

    clt: CrossLayerTranscoder
    layer: int

    @property
    def cfg(self) -> SaeConfig:
        return self.clt.cfg.layer_config()

    @property
    def W_enc_FD(self) -> torch.Tensor:
        return self.clt.W_enc[self.layer]

    @property
    def b_enc(self) -> torch.Tensor:
        return self.clt.b_enc_LF[self.layer]

    @property
    def b_dec(self) -> torch.Tensor:
        return self.clt.b_dec_LD[self.layer]

    @property
    def W_skip(self) -> torch.Tensor | None:
        return self.clt.W_skip[self.layer] if self.clt.cfg.skip else None

    @property
    def W_dec(self) -> torch.Tensor:
        """[F, D]: the decoder into this layer's own MLP output (l' = l)."""
        return self.clt.decoder(self.layer)[:, 0]

    @property
    def decoder_rows(self) -> torch.Tensor:
        """[F, (L - l) * D]: each feature's writes into output layers l..L-1, concatenated."""
        return self.clt.W_dec[self.layer]

    @property
    def output_layers(self) -> range:
        return range(self.layer, self.clt.cfg.n_layers)

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Dense codes [N, F] of this layer's encoder (inference semantics)."""
        return self.clt.cfg.activate(self.clt.pre_acts(self.layer, x_ND), self.clt.layer_threshold(self.layer))


def init_clt(cfg: CltConfig, target_sample_LND: torch.Tensor, seed: int, encoder_scale: float = 0.5):
    """A fresh CLT: random unit decoder rows, encoder rows of norm ``encoder_scale``, b_dec at each target's mean.

    ``target_sample_LND``: normalized MLP outputs of every layer. 0.5 is the per-layer
    transcoders' ``ENCODER_INIT_SCALE``.
    """
    clt = CrossLayerTranscoder(cfg).initialize(torch.Generator().manual_seed(seed), encoder_scale)
    with torch.no_grad():
        clt.b_dec_LD.copy_(target_sample_LND.float().mean(1))
    return clt


def export_clt(clt: CrossLayerTranscoder, input_scale_L, output_scale_L) -> CrossLayerTranscoder:
    """An inference copy on raw activations of one trained on ``s_in[l] * x_l`` -> ``s_out[l] * y_l``.

    Codes come out in raw input units (f_l / s_in[l]): b_enc[l] and thresholds are divided
    by s_in[l]. Then y_l' = sum_l (f_l / s_in[l]) (s_in[l] / s_out[l']) W_dec[l][:, l'-l]
    + b_dec[l'] / s_out[l'] + (s_in[l'] / s_out[l']) x_l' W_skip[l']^T. A BatchTopK CLT
    becomes a JumpReLU one with each layer's global threshold on every latent of that layer.
    """
    cfg = clt.cfg
    s_in = torch.as_tensor(input_scale_L).double().tolist()
    s_out = torch.as_tensor(output_scale_L).double().tolist()
    if len(s_in) != cfg.n_layers or len(s_out) != cfg.n_layers:
        raise ValueError(f"export_clt needs one input and one output scale per layer ({cfg.n_layers})")
    arch = "jumprelu" if cfg.architecture == "batchtopk" else cfg.architecture
    like = clt.b_dec_LD
    exported = CrossLayerTranscoder(dataclasses.replace(cfg, architecture=arch)).to(like.device, like.dtype)
    with torch.no_grad():
        for layer in range(cfg.n_layers):
            exported.W_enc[layer].copy_(clt.W_enc[layer])
            exported.b_enc_LF[layer].copy_(clt.b_enc_LF[layer] / s_in[layer])
            ratios = [s_in[layer] / s_out[out] for out in range(layer, cfg.n_layers)]
            ratio_O = torch.tensor(ratios, dtype=torch.float64)
            exported.decoder(layer).copy_(clt.decoder(layer) * ratio_O.to(like)[None, :, None])
            exported.b_dec_LD[layer].copy_(clt.b_dec_LD[layer] / s_out[layer])
            if cfg.skip:
                exported.W_skip[layer].copy_(clt.W_skip[layer] * (s_in[layer] / s_out[layer]))
            if arch == "jumprelu":
                exported.log_threshold_LF[layer].copy_(torch.log(clt.threshold(layer).float() / s_in[layer]))
    return exported.eval()
