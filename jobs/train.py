"""`saescope train`: train an SAE on a run's activation cache, checkpointed and exactly resumable.

Wires storage (the cache stream, checkpoints, the artifact) to pipeline (SAE,
trainer, metrics). Re-running on an interrupted SAE resumes from its newest
checkpoint and reaches the same weights as an uninterrupted run; a finished SAE
is left alone unless --force is given (or another --name is used).

Under `torchrun` every rank walks the same batch stream and trains on its slice
of each batch (gradients and statistics summed over ranks, see
pipeline.sae.training), so all ranks hold the same SAE and a checkpoint resumes with
any world size. Rank 0 alone takes the lock, writes the log, checkpoints and the
artifact, and evaluates; the other ranks wait for it where files change.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from jobs.console import format_metrics, human_count, progress
from jobs.heldout import EvalSettings, evaluate
from jobs.options import (
    ConfigError,
    add_config_arguments,
    auto_or,
    config_from_args,
    config_to_mapping,
    option,
    require,
)
from jobs.run import saelens_meta, write_sae
from jobs.torchrun import agreed_dtype, exclusive_on_main
from jobs.train_start import delete_trained, fresh_start, newest_checkpoint, resume, weights_config
from pipeline.runtime.distributed import Group, from_environment, is_main_process
from pipeline.runtime.precision import resolve_device
from pipeline.sae.model import ARCHITECTURES, SaeConfig, export_sae
from pipeline.sae.schedule import auto_lr, default_warmup_steps
from pipeline.sae.training import (
    DEAD_WINDOW_CAP,
    StepStats,
    TrainConfig,
    TrainState,
    default_auxk_dead_tokens,
    make_optimizer,
    state_tree,
    train_sae,
)
from storage.checkpoints import save_checkpoint
from storage.constants import (
    CHECKPOINTS_DIR,
    DEFAULT_SAE_NAME,
    TRAIN_LOCK,
)
from storage.run_config import update_run_config
from storage.sae_store import SaeRecord, is_finished, load_sae_files, sae_dir
from storage.shards import CacheManifest, activations_dir, read_manifest
from storage.train_log import append_log, log_path, truncate_log
from storage.training_data import StreamSpec, TrainingStream, default_heldout_contexts


@dataclass(frozen=True)
class TrainJobConfig:
    """Options of `saescope train` ("auto" values are resolved from the cache and saved)."""

    run: str = option(help="run directory holding an activation cache")
    name: str = option(DEFAULT_SAE_NAME, "name of the SAE inside the run (several may coexist)")
    arch: Literal["topk", "batchtopk", "relu", "jumprelu"] = option("topk", "SAE architecture")
    k: int = option(32, "active latents per token (topk; mean per token for batchtopk)")
    d_sae: int | None = option(None, "number of latents (default: expansion x d_model)", parse=auto_or(int))
    expansion: int = option(8, "latents per residual dimension when --d-sae is not given")
    tokens: int | None = option(
        None, "training tokens (default: 10 passes over the cache's training part)", parse=auto_or(int)
    )
    batch_size: int = option(4096, "tokens per optimizer step")
    lr: float | None = option(None, "peak Adam learning rate (default: auto, see README)", parse=auto_or(float))
    warmup_steps: int | None = option(
        None, "learning-rate warm-up steps (default: 5%% of steps, at most 1000)", parse=auto_or(int)
    )
    decay_fraction: float = option(0.2, "linear decay to zero over this final fraction of steps")
    dtype: Literal["auto", "float32", "bfloat16"] = option("auto", "autocast dtype of the SAE forward; auto measures")
    seed: int = option(0, "seed of the initialization and the data order")
    auxk_coef: float = option(1 / 32, "weight of the AuxK loss that revives dead latents (topk, batchtopk)")
    l1_coef: float = option(5.0, "L1 penalty on f_i * ||W_dec[i]|| (relu)")
    l0_coef: float = option(0.05, "L0 penalty (jumprelu)")
    dead_window: int | None = option(
        None, "a latent silent this many tokens is dead (default: min(10M, training tokens))", parse=auto_or(int)
    )
    checkpoint_every: int | None = option(
        None, "checkpoint every N steps (default: about 10 per run)", parse=auto_or(int)
    )
    heldout_contexts: int | None = option(
        None, "contexts at the end of the cache kept for evaluation (default: 5%%, max 256)", parse=auto_or(int)
    )
    lm_eval_contexts: int = option(64, "held-out contexts run through the model for CE-loss recovered (0: skip)")
    window_shards: int = option(8, "shards pooled in one shuffling window")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    force: bool = option(False, "retrain even if this SAE is finished (deletes it first)")

    def __post_init__(self):
        require(self.arch in ARCHITECTURES, f"unknown architecture {self.arch!r}")
        require(self.k >= 1, f"--k must be at least 1, got {self.k}")
        require(self.d_sae is None or self.d_sae > 1, f"--d-sae must be at least 2, got {self.d_sae}")
        require(
            self.d_sae is None or self.arch not in ("topk", "batchtopk") or self.k < self.d_sae,
            f"--k ({self.k}) must be smaller than --d-sae ({self.d_sae})",
        )
        require(self.expansion >= 1, f"--expansion must be at least 1, got {self.expansion}")
        require(self.tokens is None or self.tokens > 0, f"--tokens must be positive, got {self.tokens}")
        require(self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}")
        require(self.lr is None or (math.isfinite(self.lr) and self.lr > 0), f"--lr must be positive, got {self.lr}")
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


@dataclass(frozen=True)
class TrainSummary:
    folder: Path
    config: TrainJobConfig
    metrics: dict
    already_done: bool
    resumed_from: int
    seconds: float
    epochs: float


def resolve(cfg: TrainJobConfig, manifest: CacheManifest, stream: TrainingStream | None = None) -> TrainJobConfig:
    """Fill every "auto" from the cache's shape and size; validate the result."""
    d_sae = cfg.d_sae or cfg.expansion * manifest.d_model
    if cfg.arch in ("topk", "batchtopk") and cfg.k >= d_sae:
        raise ConfigError(f"--k ({cfg.k}) must be smaller than d_sae ({d_sae})")
    heldout = (
        cfg.heldout_contexts if cfg.heldout_contexts is not None else default_heldout_contexts(manifest.n_contexts)
    )
    resolved = dataclasses.replace(cfg, d_sae=d_sae, heldout_contexts=heldout)
    if stream is None:
        return resolved
    per_epoch = stream.batches_per_epoch() * cfg.batch_size
    tokens = cfg.tokens or 10 * per_epoch
    steps = max(1, tokens // cfg.batch_size)
    return dataclasses.replace(
        resolved,
        tokens=steps * cfg.batch_size,
        lr=cfg.lr or auto_lr(d_sae, steps),
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup_steps(steps),
        dead_window=cfg.dead_window or min(DEAD_WINDOW_CAP, steps * cfg.batch_size),
        checkpoint_every=cfg.checkpoint_every or max(10, steps // 10),
    )


def _stream(cfg: TrainJobConfig, manifest: CacheManifest) -> TrainingStream:
    heldout = (
        cfg.heldout_contexts if cfg.heldout_contexts is not None else default_heldout_contexts(manifest.n_contexts)
    )
    spec = StreamSpec(
        batch_size=cfg.batch_size, seed=cfg.seed, window_shards=cfg.window_shards, heldout_contexts=heldout
    )
    return TrainingStream(activations_dir(Path(cfg.run)), manifest, spec)


def trainer_config(cfg: TrainJobConfig, compute_dtype: torch.dtype) -> TrainConfig:
    steps = cfg.tokens // cfg.batch_size
    return TrainConfig(
        total_steps=steps,
        lr=cfg.lr,
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


def _log_line(stats: StepStats, state: TrainState, cfg: TrainJobConfig, started: float) -> dict:
    return {
        **stats._asdict(),
        "tokens": state.tokens_seen,
        "seconds": round(time.perf_counter() - started, 2),
        "dead_fraction": state.dead_fraction(cfg.dead_window),
    }


def _record(
    cfg: TrainJobConfig, manifest: CacheManifest, scale: float, state: TrainState, metrics: dict, trained_arch: str
) -> dict:
    return {
        "format_version": 1,
        "trained_architecture": trained_arch,
        "model": manifest.provenance["model"],
        "hook": manifest.provenance["hook"],
        "normalization": {"factor": scale, "target": "E||x|| = sqrt(d_in)", "folded": True},
        "training": {**config_to_mapping(cfg), "tokens_trained": state.tokens_seen, "steps": state.step},
        "metrics": metrics,
    }


def _train_loop(cfg, folder, sae, optimizer, state, stream, scale, tcfg, group: Group) -> TrainState:
    started = time.perf_counter()
    bar = progress(
        tcfg.total_steps * cfg.batch_size, f"train {cfg.name}", initial=state.tokens_seen, disable=not group.is_main
    )

    def on_log(stats: StepStats, st: TrainState) -> None:
        if group.is_main:
            append_log(folder, _log_line(stats, st, cfg, started))
        bar.update(st.tokens_seen - bar.n)
        bar.set_postfix(
            loss=f"{stats.loss:.3g}",
            fvu=f"{stats.fvu:.3f}",
            l0=f"{stats.l0:.1f}",
            dead=f"{100 * st.dead_fraction(cfg.dead_window):.1f}%",
            refresh=False,
        )

    def on_checkpoint(st: TrainState, opt) -> None:
        if group.is_main:
            job = {"weights_config": weights_config(cfg), "scale": scale}
            save_checkpoint(folder / CHECKPOINTS_DIR, st.step, {"job": job, "trainer": state_tree(sae, opt, st)})

    part = (group.rank, group.world)
    batches = (x * scale for x in stream.iter_batches(start=state.step, device=sae.W_dec.device, part=part))
    with bar:
        result = train_sae(sae, batches, tcfg, state, optimizer, on_log, on_checkpoint, group)
    return result.state


def run_train(cfg: TrainJobConfig, say: Callable[[str], None] = lambda _: None) -> TrainSummary:
    """Train (or resume, or skip) the SAE described by ``cfg``; ``say`` receives progress notes."""
    run_dir = Path(cfg.run)
    manifest = read_manifest(activations_dir(run_dir))
    folder = sae_dir(run_dir, cfg.name)
    if is_finished(folder) and not cfg.force:
        _, saved = load_sae_files(folder)
        return TrainSummary(folder, cfg, SaeRecord(saved).training_metrics, True, 0, 0.0, 0.0)
    resolve(cfg, manifest)  # validate shapes before touching anything
    group = from_environment(resolve_device(cfg.device))
    if cfg.batch_size < group.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is smaller than the {group.world} ranks sharing each batch")
    if not group.is_main:
        say = _silent
    with exclusive_on_main(group, folder / TRAIN_LOCK, f"SAE {cfg.name!r} of {run_dir}"):
        return _train_locked(cfg, run_dir, manifest, folder, say, group)


def _silent(_: str) -> None:
    pass


def _train_locked(
    cfg: TrainJobConfig, run_dir: Path, manifest: CacheManifest, folder: Path, say, group: Group
) -> TrainSummary:
    if cfg.force and group.is_main:
        delete_trained(folder)
    stream = _stream(cfg, manifest)
    cfg = resolve(cfg, manifest, stream)
    device = group.device(resolve_device(cfg.device))
    checkpoint = newest_checkpoint(folder, group)
    # an interrupted run keeps the dtype it chose when it started ("auto" is not measured again)
    recorded_dtype = checkpoint["job"]["weights_config"].get("dtype") if checkpoint else None
    compute = agreed_dtype(group, recorded_dtype or cfg.dtype, device)
    cfg = dataclasses.replace(cfg, dtype=compute.name)
    tcfg = trainer_config(cfg, compute.dtype)
    per_epoch = stream.batches_per_epoch() * cfg.batch_size
    say(
        f"training on {human_count(cfg.tokens)} tokens: {cfg.tokens / per_epoch:.1f} passes over the cache's "
        f"{human_count(per_epoch)} training tokens ({cfg.heldout_contexts} contexts held out); "
        f"lr {cfg.lr:.2e}, compute {compute.name} ({compute.reason})"
    )
    if group.distributed:
        say(
            f"data-parallel over {group.world} ranks: each computes {human_count(cfg.batch_size // group.world)} "
            f"of every batch's {human_count(cfg.batch_size)} tokens"
        )
    folder.mkdir(parents=True, exist_ok=True)
    resumed = resume(checkpoint, folder, cfg, SaeConfig(manifest.d_model, cfg.d_sae, cfg.arch, cfg.k), device, tcfg)
    if resumed is None:
        sae, scale = fresh_start(cfg, stream, device, group)
        optimizer, state = make_optimizer(sae, tcfg), TrainState.fresh(cfg.d_sae, device)
        if group.is_main:
            log_path(folder).unlink(missing_ok=True)
    else:
        sae, optimizer, state, scale = resumed
        if group.is_main:
            truncate_log(folder, state.step)
    resumed_from = state.step
    if resumed_from:
        say(f"resuming {cfg.name!r} from its checkpoint at step {resumed_from} of {tcfg.total_steps}")
    if group.is_main:
        update_run_config(run_dir, f"train.{cfg.name}", config_to_mapping(cfg))
    started = time.perf_counter()
    state = _train_loop(cfg, folder, sae, optimizer, state, stream, scale, tcfg, group)
    seconds = time.perf_counter() - started
    if not group.is_main:  # rank 0 evaluates and writes the artifact; the others wait, then all leave together
        group.barrier()
        return TrainSummary(folder, cfg, {}, False, resumed_from, seconds, 0.0)
    speed = (state.tokens_seen - resumed_from * cfg.batch_size) / max(seconds, 1e-9)
    metrics = _finish(cfg, run_dir, manifest, folder, sae, state, scale, device, say, speed)
    group.barrier()
    epochs = state.tokens_seen / max(1, per_epoch)
    return TrainSummary(folder, cfg, metrics, False, resumed_from, seconds, epochs)


def _finish(cfg, run_dir: Path, manifest, folder: Path, sae, state, scale: float, device, say, speed: float) -> dict:
    """Rank 0: evaluate the exported SAE on held-out data, write the artifact, drop the checkpoints."""
    exported = export_sae(sae, scale)
    settings = EvalSettings(heldout_contexts=cfg.heldout_contexts, lm_contexts=cfg.lm_eval_contexts)
    say(f"evaluating on {cfg.heldout_contexts} held-out contexts")
    metrics = evaluate(exported, run_dir, manifest, settings, device)
    metrics.update(
        dead_fraction=state.dead_fraction(cfg.dead_window),
        dead_window_tokens=cfg.dead_window,
        training_tokens_per_second=speed,
    )
    record = _record(cfg, manifest, scale, state, metrics, cfg.arch)
    write_sae(folder, exported, saelens_meta(manifest), record, metrics)
    shutil.rmtree(folder / CHECKPOINTS_DIR, ignore_errors=True)  # a finished SAE needs no optimizer state
    return metrics


def format_summary(summary: TrainSummary) -> str:
    cfg = summary.config
    if summary.already_done:
        head = f"{summary.folder}: already trained; nothing to do (use --force to retrain, or --name for another SAE)"
    else:
        resumed = f", resumed from step {summary.resumed_from}" if summary.resumed_from else ""
        head = (
            f"trained {cfg.arch} SAE {cfg.name!r} (d_sae {cfg.d_sae}, k {cfg.k}) on {human_count(cfg.tokens)} tokens "
            f"({summary.epochs:.1f} passes over the cache) in {summary.seconds:.0f}s{resumed}"
        )
    return "\n".join(
        [
            head,
            *format_metrics(summary.metrics),
            f"  saved {summary.folder}",
            f"next: saescope eval --run {cfg.run}   |   saescope index --run {cfg.run}",
        ]
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a sparse autoencoder on a run's activation cache")
    add_config_arguments(parser, TrainJobConfig)
    parser.set_defaults(handler=command)


def command(args) -> int:
    summary = run_train(config_from_args(TrainJobConfig, args), say=print)
    if is_main_process():
        print(format_summary(summary))
    return 0
