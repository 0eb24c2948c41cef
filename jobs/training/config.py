"""Options of `saescope train` and how their "auto" values resolve against a cache.

``TrainJobConfig`` is the command line (every option, its help and its checks);
``resolve`` fills what the cache decides (width, held-out split, hook point, token
budget, optimizer, learning rate, warm-up, dead window, checkpoint interval);
``trainer_config`` turns a resolved member into the trainer's own config;
``grid_members`` splits a config with comma lists into one scalar config per SAE.

Naming (``member_name``): ``{name}-{arch}-x{expansion}-k{k}`` (``d{d_sae}`` when
--d-sae is given, no ``-k`` for relu/jumprelu, ``-lr{lr}`` when --lr is a list);
the ``{name}-`` prefix is dropped when --name is left at "default". A config
without lists is one SAE named --name, trained exactly as before grids existed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from jobs.cache_request import check_layers_text
from jobs.options import ConfigError, auto_or, option, require
from jobs.training.values import architecture, as_tuple, listed, one_value
from pipeline.sae.matryoshka import check_widths, default_widths
from pipeline.sae.model import ARCHITECTURES, SPARSE_ARCHITECTURES, SaeConfig
from pipeline.sae.schedule import auto_lr_for, default_warmup_steps
from pipeline.sae.training import DEAD_WINDOW_CAP, OPTIMIZERS, TrainConfig, default_auxk_dead_tokens
from storage.constants import DEFAULT_SAE_NAME
from storage.shards import CacheManifest
from storage.training_data import TrainingStream, default_heldout_contexts

SIGNUM_SF_BELOW_PASSES = 2
"""bench/train_throughput.py on the demo cache (d_sae 4608): after 1 pass schedule-free signum reached a
lower held-out FVU than Adam (0.29 vs 0.36 at 8 steps; 0.085 vs 0.094 at 45 steps), after 10 passes Adam
did (0.080 vs 0.087 float32, 0.080 vs 0.091 bfloat16)."""


@dataclass(frozen=True)
class TrainJobConfig:
    """Options of `saescope train` ("auto" values are resolved from the cache and saved)."""

    run: str = option(help="run directory holding an activation cache")
    name: str = option(
        DEFAULT_SAE_NAME,
        "name of the SAE inside the run (several may coexist); for a grid, the prefix of each member's "
        "name {name}-{arch}-x{expansion}-k{k} (d{d_sae} with --d-sae, no k for relu/jumprelu, -lr{lr} when "
        "--lr is a list; no prefix when left at 'default')",
    )
    arch: Literal["topk", "batchtopk", "relu", "jumprelu", "matryoshka"] | tuple[str, ...] = option(
        "topk",
        "SAE architecture (topk, batchtopk, relu, jumprelu, matryoshka: Matryoshka BatchTopK); a comma list "
        "(as for --k, --d-sae, --expansion, --lr) trains a grid",
        parse=listed(architecture),
    )
    k: int | tuple[int, ...] = option(
        32,
        "active latents per token (topk; mean per token for batchtopk, matryoshka); a comma list trains a grid",
        parse=listed(int),
    )
    d_sae: int | tuple[int, ...] | None = option(
        None, "number of latents (default: expansion x d_model); a comma list trains a grid", parse=listed(auto_or(int))
    )
    expansion: int | tuple[int, ...] = option(
        8, "latents per residual dimension when --d-sae is not given; a comma list trains a grid", parse=listed(int)
    )
    matryoshka_widths: str | None = option(
        None,
        "nested prefix sizes of a matryoshka SAE: a strictly increasing comma list ending at d_sae "
        "(default: auto = d_sae/16,d_sae/8,d_sae/4,d_sae/2,d_sae); shared by a grid's matryoshka members",
        parse=auto_or(str),
    )
    tokens: int | None = option(
        None, "training tokens (default: 10 passes over the cache's training part)", parse=one_value(auto_or(int))
    )
    batch_size: int = option(4096, "tokens per optimizer step", parse=one_value(int))
    lr: float | tuple[float | None, ...] | None = option(
        None,
        "peak learning rate (default: auto, see README; signum-sf 2.5e-3/sqrt(d_sae/2^14)); a comma list trains a grid",
        parse=listed(auto_or(float)),
    )
    optimizer: str = option(
        "auto",
        "signum-sf: schedule-free signum (Defazio et al. 2024), no learning-rate decay, the SAE saved at its "
        "averaged weights; adam: Adam with --decay-fraction linear decay; auto: signum-sf for runs of under "
        f"{SIGNUM_SF_BELOW_PASSES} passes over the cache and for transcoders, else adam (see README)",
        choices=("auto", *OPTIMIZERS),
    )
    warmup_steps: int | None = option(
        None, "learning-rate warm-up steps (default: 5%% of steps, at most 1000)", parse=auto_or(int)
    )
    decay_fraction: float = option(0.2, "linear decay to zero over this final fraction of steps (adam only)")
    dtype: Literal["auto", "float32", "bfloat16"] = option("auto", "autocast dtype of the SAE forward; auto measures")
    seed: int = option(0, "seed of the initialization and the data order", parse=one_value(int))
    auxk_coef: float = option(1 / 32, "weight of the AuxK loss that revives dead latents (topk, batchtopk, matryoshka)")
    l1_coef: float = option(5.0, "L1 penalty on f_i * ||W_dec[i]|| (relu)")
    l0_coef: float = option(0.05, "L0 penalty (jumprelu)")
    dead_window: int | None = option(
        None, "a latent silent this many tokens is dead (default: min(10M, training tokens))", parse=auto_or(int)
    )
    checkpoint_every: int | None = option(
        None, "checkpoint every N steps (default: about 10 per run)", parse=auto_or(int)
    )
    heldout_contexts: int | None = option(
        None,
        "contexts at the end of the cache kept for evaluation (default: 5%%, max 256)",
        parse=one_value(auto_or(int)),
    )
    lm_eval_contexts: int = option(64, "held-out contexts run through the model for CE-loss recovered (0: skip)")
    window_shards: int = option(8, "shards pooled in one shuffling window", parse=one_value(int))
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    force: bool = option(False, "retrain even if this SAE is finished (deletes it first)")
    transcoder: bool = option(
        False,
        "train a skip transcoder per layer (MLP input -> MLP output) from the live model instead of an SAE; "
        "--name names the set (runs/R/transcoders/NAME), --tokens defaults to one pass over the cache's tokens",
    )
    layers: str | None = option(None, "layers for --transcoder: all, 5, 0-29 or 1,3,8-10 (default: all)")
    skip: bool = option(
        True, "with --transcoder: a linear skip path W_skip beside the features (--no-skip: plain transcoders)"
    )
    cross_layer: bool = option(
        False,
        "with --transcoder: one cross-layer transcoder over every layer (each layer's features write that MLP's "
        "output and every later one's) instead of one per layer; --d-sae per layer, default 4 x d_model",
    )
    hook: Literal["resid-post", "attn-out", "mlp-in", "mlp-out"] | None = option(
        None, "in a cache of several hook points, the kind to train on (default: the cache's primary point's)"
    )
    layer: int | None = option(
        None, "in a cache of several hook points, the block to train on (default: the cache's primary point's)"
    )

    def __post_init__(self):
        require(self.layers is None or self.transcoder, "--layers applies to --transcoder only")
        require(self.skip or self.transcoder, "--no-skip applies to --transcoder only (SAEs have no skip path)")
        require(self.transcoder or not self.cross_layer, "--cross-layer applies to --transcoder only")
        if self.layers is not None:
            check_layers_text(self.layers)
        require(
            not self.transcoder or (self.hook is None and self.layer is None),
            "--transcoder reads mlp-in and mlp-out of the live model: pick blocks with --layers, not --hook/--layer",
        )
        if self.matryoshka_widths is not None:
            require("matryoshka" in as_tuple(self.arch), "--matryoshka-widths is only for --arch matryoshka")
            check_matryoshka_widths(self.matryoshka_widths, self.d_sae if isinstance(self.d_sae, int) else None)
        if any(isinstance(getattr(self, name), tuple) for name in ("arch", "k", "d_sae", "expansion", "lr")):
            self._check_lists()
            return
        require(self.arch in ARCHITECTURES, f"unknown architecture {self.arch!r}")
        require(self.k >= 1, f"--k must be at least 1, got {self.k}")
        require(self.d_sae is None or self.d_sae > 1, f"--d-sae must be at least 2, got {self.d_sae}")
        require(
            self.d_sae is None or self.arch not in SPARSE_ARCHITECTURES or self.k < self.d_sae,
            f"--k ({self.k}) must be smaller than --d-sae ({self.d_sae})",
        )
        require(self.expansion >= 1, f"--expansion must be at least 1, got {self.expansion}")
        require(self.lr is None or (math.isfinite(self.lr) and self.lr > 0), f"--lr must be positive, got {self.lr}")
        self._check_shared()

    def _check_lists(self) -> None:
        """A grid: each member's own checks (its config is built here), then the shared options'."""
        grid_members(self)
        self._check_shared()

    def _check_shared(self) -> None:
        require(self.tokens is None or self.tokens > 0, f"--tokens must be positive, got {self.tokens}")
        require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        require(0 <= self.decay_fraction <= 1, f"--decay-fraction must be in [0, 1], got {self.decay_fraction}")
        require(self.window_shards >= 1, "--window-shards must be at least 1")
        require(self.lm_eval_contexts >= 0, "--lm-eval-contexts must be >= 0")
        for name in ("heldout_contexts", "warmup_steps", "dead_window", "checkpoint_every"):
            value = getattr(self, name)
            least = 0 if name == "warmup_steps" else 1
            flag = "--" + name.replace("_", "-")
            require(value is None or value >= least, f"{flag} must be at least {least}, got {value}")
        for name in ("auxk_coef", "l1_coef", "l0_coef"):
            require(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")


def resolve(cfg: TrainJobConfig, manifest: CacheManifest, stream: TrainingStream | None = None) -> TrainJobConfig:
    """Fill every "auto" from the cache's shape and size; validate the result."""
    d_sae = cfg.d_sae or cfg.expansion * manifest.d_model
    if cfg.arch in SPARSE_ARCHITECTURES and cfg.k >= d_sae:
        raise ConfigError(f"--k ({cfg.k}) must be smaller than d_sae ({d_sae})")
    if cfg.arch == "matryoshka":
        widths = check_matryoshka_widths(cfg.matryoshka_widths, d_sae) or default_widths(d_sae)
        cfg = dataclasses.replace(cfg, matryoshka_widths=",".join(map(str, widths)))
    heldout = (
        cfg.heldout_contexts if cfg.heldout_contexts is not None else default_heldout_contexts(manifest.n_contexts)
    )
    resolved = dataclasses.replace(
        cfg, d_sae=d_sae, heldout_contexts=heldout, hook=manifest.hook_kind, layer=manifest.layer
    )
    if stream is None:
        return resolved
    per_epoch = stream.batches_per_epoch() * cfg.batch_size
    tokens = cfg.tokens or 10 * per_epoch
    steps = max(1, tokens // cfg.batch_size)
    optimizer = auto_optimizer(cfg.optimizer, steps * cfg.batch_size / max(1, per_epoch))
    return dataclasses.replace(
        resolved,
        tokens=steps * cfg.batch_size,
        optimizer=optimizer,
        lr=cfg.lr or auto_lr_for(optimizer, d_sae, steps),
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup_steps(steps),
        dead_window=cfg.dead_window or min(DEAD_WINDOW_CAP, steps * cfg.batch_size),
        checkpoint_every=cfg.checkpoint_every or max(10, steps // 10),
    )


def check_matryoshka_widths(text: str | None, d_sae: int | None) -> tuple[int, ...]:
    """The widths of ``--matryoshka-widths`` (() when auto); a ConfigError naming the option when they are bad.

    ``d_sae`` None (not known yet): the last width is checked once it is, in ``resolve``.
    """
    if text is None:
        return ()
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--matryoshka-widths {text!r} is not a comma list of integers") from None
    try:
        check_widths(widths, d_sae if d_sae is not None else widths[-1])
    except ValueError as error:
        raise ConfigError(f"--matryoshka-widths {text}: {error}") from None
    return widths


def sae_shape(cfg: TrainJobConfig, d_in: int) -> SaeConfig:
    """The SaeConfig of a resolved member (matryoshka widths as resolved)."""
    widths = check_matryoshka_widths(cfg.matryoshka_widths, cfg.d_sae)
    return SaeConfig(d_in, cfg.d_sae, cfg.arch, cfg.k, matryoshka_widths=widths)


def auto_optimizer(requested: str, passes: float) -> str:
    """ "auto": schedule-free signum for short runs, Adam for long ones (held-out FVU measured both ways)."""
    if requested != "auto":
        return requested
    return "signum-sf" if passes < SIGNUM_SF_BELOW_PASSES else "adam"


def trainer_config(cfg: TrainJobConfig, compute_dtype: torch.dtype) -> TrainConfig:
    steps = cfg.tokens // cfg.batch_size
    return TrainConfig(
        total_steps=steps,
        lr=cfg.lr,
        optimizer=cfg.optimizer,
        warmup_steps=cfg.warmup_steps,
        decay_fraction=cfg.decay_fraction,
        auxk_coef=cfg.auxk_coef,
        auxk_dead_tokens=default_auxk_dead_tokens(cfg.tokens, cfg.batch_size),
        l1_coef=cfg.l1_coef,
        l1_warmup_steps=max(1, steps // 20),
        l0_coef=cfg.l0_coef,
        compute_dtype=compute_dtype,
        log_every=max(1, min(50, steps // 100)),
        checkpoint_every=cfg.checkpoint_every,
    )


def member_name(prefix: str, member: TrainJobConfig, lr_listed: bool) -> str:
    """The folder name of one grid member (see the module docstring)."""
    parts = [member.arch, f"d{member.d_sae}" if member.d_sae is not None else f"x{member.expansion}"]
    if member.arch in SPARSE_ARCHITECTURES:
        parts.append(f"k{member.k}")
    if lr_listed:
        parts.append("lrauto" if member.lr is None else f"lr{member.lr:g}")
    name = "-".join(parts)
    return name if prefix == DEFAULT_SAE_NAME else f"{prefix}-{name}"


def grid_members(cfg: TrainJobConfig) -> list[TrainJobConfig]:
    """One scalar config per SAE; a config without lists gives itself (with scalars) under its own name."""
    if isinstance(cfg.d_sae, tuple) and isinstance(cfg.expansion, tuple):
        raise ConfigError("--d-sae and --expansion are both lists: give the sizes with one of them")
    sizes = [(d, cfg.expansion) for d in as_tuple(cfg.d_sae)] if cfg.d_sae is not None else []
    sizes = sizes or [(None, e) for e in as_tuple(cfg.expansion)]
    ks, lrs = as_tuple(cfg.k), as_tuple(cfg.lr)
    members: dict[str, TrainJobConfig] = {}
    for arch, (d_sae, expansion), lr in itertools.product(as_tuple(cfg.arch), sizes, lrs):
        for k in ks if arch in SPARSE_ARCHITECTURES else ks[:1]:
            widths = cfg.matryoshka_widths if arch == "matryoshka" else None
            member = dataclasses.replace(
                cfg, arch=arch, k=k, d_sae=d_sae, expansion=expansion, lr=lr, matryoshka_widths=widths
            )
            members.setdefault(member_name(cfg.name, member, len(lrs) > 1), member)
    if len(members) == 1:
        return list(members.values())
    return [dataclasses.replace(member, name=name) for name, member in members.items()]
