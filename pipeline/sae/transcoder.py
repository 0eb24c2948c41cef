"""Skip transcoders: sparse codes of an MLP's input that reconstruct the MLP's output.

Shape legend: N tokens, D d_model, F latents.

    pre   = x @ W_enc + b_enc                              x: the MLP input (mlp-in) [N, D]
    f     = act(pre)                                       sparse codes [N, F]
    y_hat = f @ W_dec + b_dec + x @ W_skip^T               y: the MLP output (mlp-out) [N, D]

A Transcoder is an Sae whose encoder subtracts nothing from its input and whose
output adds a learned linear skip path (Paulo et al. 2025, "Transcoders beat
sparse autoencoders for interpretability"). Activation functions, sparse kernels
and the training step are the SAE's; the loss compares ``y_hat`` with ``y``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.sae.model import Sae, SaeConfig


class Transcoder(Sae):
    """An MLP replacement with SAELens-layout weights plus ``W_skip`` [D_out, D_in]."""

    def __init__(self, cfg: SaeConfig, skip: bool = True, device: torch.device | str | None = None):
        super().__init__(cfg, device)
        self.register_buffer("no_offset", torch.zeros(cfg.d_in, device=device), persistent=False)
        skip_DD = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_in, device=device)) if skip else None
        self.register_parameter("W_skip", skip_DD)

    @property
    def input_offset(self) -> torch.Tensor:
        return self.no_offset

    def skip(self, x_ND: torch.Tensor) -> torch.Tensor | None:
        """x @ W_skip^T, or None without a skip path."""
        return None if self.W_skip is None else F.linear(x_ND, self.W_skip)


def export_transcoder(tc: Transcoder, input_scale: float, output_scale: float) -> Transcoder:
    """An inference copy on raw activations of one trained on ``s_in * x`` -> ``s_out * y``.

    Codes come out in raw input units (f / s_in): b_enc and thresholds are divided by
    s_in. Then y = (f / s_in) (s_in / s_out) W_dec + b_dec / s_out + (s_in / s_out) x W_skip^T,
    so the copy's decoder rows have norm s_in / s_out instead of 1. A BatchTopK
    transcoder becomes a JumpReLU one with its global threshold on every latent.
    """
    cfg = tc.cfg
    arch = "jumprelu" if cfg.architecture == "batchtopk" else cfg.architecture
    exported_cfg = SaeConfig(cfg.d_in, cfg.d_sae, arch, cfg.k, cfg.jumprelu_init_threshold, cfg.jumprelu_bandwidth)
    exported = Transcoder(exported_cfg, skip=tc.W_skip is not None).to(tc.W_dec.device)
    ratio = input_scale / output_scale
    with torch.no_grad():
        exported.W_enc_FD.copy_(tc.W_enc_FD)
        exported.b_enc.copy_(tc.b_enc / input_scale)
        exported.W_dec.copy_(tc.W_dec * ratio)
        exported.b_dec.copy_(tc.b_dec / output_scale)
        if tc.W_skip is not None:
            exported.W_skip.copy_(tc.W_skip * ratio)
        if arch == "jumprelu":
            exported.log_threshold.copy_(torch.log(tc.threshold.float() / input_scale))
    return exported.eval()
