"""`saescope train`: train an SAE on a run's activation cache, checkpointed and exactly resumable.

Wires storage (the cache stream, checkpoints, the artifact) to pipeline (SAE,
trainer, metrics). Re-running on an interrupted SAE resumes from its newest
checkpoint and reaches the same weights as an uninterrupted run; a finished SAE
is left alone unless --force is given (or another --name is used).

Comma lists in --arch, --k, --d-sae/--expansion and --lr train a grid: every
member is an SAE in its own folder, fed the same batches from one read of the
cache (jobs.train_grid), and ends exactly where it would trained alone.

``--arch matryoshka`` trains a Matryoshka BatchTopK SAE (SAELens: matryoshka_batchtopk)
whose nested prefixes are ``--matryoshka-widths`` (default d_sae/16, /8, /4, /2, d_sae);
its held-out FVU and L0 are also reported per prefix. Each
member resumes from its own newest checkpoint; a finished one is skipped.

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
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from jobs.console import format_metrics, human_count
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
from jobs.run import check_reads_point, saelens_meta, write_sae
from jobs.torchrun import agreed_dtype, exclusive_on_main
from jobs.train_grid import (
    announce,
    architecture,
    as_tuple,
    format_grid_summary,
    grid_members,
    listed,
    one_value,
    train_members,
)
from jobs.train_start import Member, delete_trained, newest_checkpoint, start_member
from jobs.train_transcoders import format_transcoder_summary, run_transcoders
from pipeline.runtime.distributed import Group, from_environment, is_main_process
from pipeline.runtime.precision import resolve_device
from pipeline.sae.matryoshka import check_widths, default_widths
from pipeline.sae.model import ARCHITECTURES, SPARSE_ARCHITECTURES, SaeConfig, export_sae
from pipeline.sae.optimizers import eval_weights
from pipeline.sae.saelens import saelens_name
from pipeline.sae.schedule import auto_lr_for, default_warmup_steps
from pipeline.sae.training import (
    DEAD_WINDOW_CAP,
    OPTIMIZERS,
    TrainConfig,
    TrainState,
    default_auxk_dead_tokens,
)
from storage.constants import (
    CHECKPOINTS_DIR,
    DEFAULT_SAE_NAME,
    TRAIN_LOCK,
)
from storage.run_config import update_run_config
from storage.sae_store import SaeRecord, is_finished, load_sae_files, sae_dir
from storage.shards import CacheManifest, activations_dir, read_manifest
from storage.training_data import StreamSpec, TrainingStream, default_heldout_contexts

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
    hook: Literal["resid-post", "attn-out", "mlp-in", "mlp-out"] | None = option(
        None, "in a cache of several hook points, the kind to train on (default: the cache's primary point's)"
    )
    layer: int | None = option(
        None, "in a cache of several hook points, the block to train on (default: the cache's primary point's)"
    )

    def __post_init__(self):
        require(self.layers is None or self.transcoder, "--layers applies to --transcoder only")
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


def run_train(cfg: TrainJobConfig, say: Callable[[str], None] = lambda _: None) -> TrainSummary:
    """Train (or resume, or skip) the one SAE described by ``cfg``; ``say`` receives progress notes."""
    summaries = run_grid(cfg, say)
    if len(summaries) != 1:
        raise ConfigError(f"the lists in these options make a grid of {len(summaries)} SAEs: use run_grid")
    return summaries[0]


def run_grid(cfg: TrainJobConfig, say: Callable[[str], None] = lambda _: None) -> list[TrainSummary]:
    """Train every SAE of ``cfg``'s grid (one SAE without lists) from one read of the cache; skip finished ones."""
    run_dir = Path(cfg.run)
    manifest = read_manifest(activations_dir(run_dir)).select(cfg.layer, cfg.hook)
    members = grid_members(cfg)
    finished = [m for m in members if _is_done(m, run_dir)]
    for member in finished:
        check_reads_point(sae_dir(run_dir, member.name), manifest)
    done = {m.name: _already_done(m, sae_dir(run_dir, m.name)) for m in finished}
    todo = [m for m in members if m.name not in done]
    for member in todo:
        resolve(member, manifest)  # validate shapes before touching anything
    if todo:
        group = from_environment(resolve_device(cfg.device))
        if cfg.batch_size < group.world:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} is smaller than the {group.world} ranks sharing each batch"
            )
        with ExitStack() as locks:
            for m in todo:
                what = f"SAE {m.name!r} of {run_dir}"
                locks.enter_context(exclusive_on_main(group, sae_dir(run_dir, m.name) / TRAIN_LOCK, what))
            trained = _train_locked(todo, run_dir, manifest, say if group.is_main else _silent, group)
        done.update(zip((m.name for m in todo), trained, strict=True))
    return [done[m.name] for m in members]


def _is_done(cfg: TrainJobConfig, run_dir: Path) -> bool:
    return is_finished(sae_dir(run_dir, cfg.name)) and not cfg.force


def _already_done(cfg: TrainJobConfig, folder: Path) -> TrainSummary:
    _, saved = load_sae_files(folder)
    record = SaeRecord(saved)
    shown = dataclasses.replace(cfg, d_sae=saved.get("d_sae", cfg.d_sae))
    return TrainSummary(folder, shown, record.training_metrics, True, 0, 0.0, 0.0)


def _silent(_: str) -> None:
    pass


def _prefixed(say: Callable[[str], None], name: str) -> Callable[[str], None]:
    return lambda text: say(f"{name}: {text}")


def _train_locked(
    todo: list[TrainJobConfig], run_dir: Path, manifest: CacheManifest, say, group: Group
) -> list[TrainSummary]:
    stream = _stream(todo[0], manifest)  # every member reads the same stream (the options that shape it are shared)
    dtypes: dict[str, object] = {}
    sample: list = []  # read on the first fresh start, then shared
    grid = len(todo) > 1
    members = [
        _prepare(m, run_dir, manifest, stream, group, say, dtypes, sample, (grid, i == 0)) for i, m in enumerate(todo)
    ]
    started = time.perf_counter()
    train_members(members, stream, group)
    seconds = time.perf_counter() - started
    per_epoch = stream.batches_per_epoch() * todo[0].batch_size
    summaries = []
    for m in members:
        metrics = {}
        if group.is_main:  # rank 0 evaluates and writes the artifacts; the others wait, then all leave together
            speed = (m.state.tokens_seen - m.resumed_from * m.cfg.batch_size) / max(seconds, 1e-9)
            told = _prefixed(say, m.cfg.name) if grid else say
            metrics = _finish(m.cfg, run_dir, manifest, m.folder, m.sae, m.optimizer, m.state, m.scale, told, speed)
        epochs = m.state.tokens_seen / max(1, per_epoch) if group.is_main else 0.0
        summaries.append(TrainSummary(m.folder, m.cfg, metrics, False, m.resumed_from, seconds, epochs))
    group.barrier()
    return summaries


def _prepare(cfg, run_dir: Path, manifest, stream, group: Group, say, dtypes: dict, sample: list, place) -> Member:
    """One member ready to train: resolved options, and its checkpoint's state or a fresh start."""
    folder = sae_dir(run_dir, cfg.name)
    if cfg.force and group.is_main:
        delete_trained(folder)
    cfg = resolve(cfg, manifest, stream)
    device = group.device(resolve_device(cfg.device))
    checkpoint = newest_checkpoint(folder, group)
    # an interrupted run keeps the dtype it chose when it started ("auto" is not measured again)
    requested = (checkpoint["job"]["weights_config"].get("dtype") if checkpoint else None) or cfg.dtype
    if requested not in dtypes:  # measured once per job, not once per member
        dtypes[requested] = agreed_dtype(group, requested, device)
    compute = dtypes[requested]
    cfg = dataclasses.replace(cfg, dtype=compute.name)
    tcfg = trainer_config(cfg, compute.dtype)
    announce(cfg, stream, compute, group, say, *place)
    shape = sae_shape(cfg, manifest.d_model)
    member = start_member(cfg, folder, checkpoint, shape, stream, device, tcfg, group, sample)
    if member.resumed_from:
        say(f"resuming {cfg.name!r} from its checkpoint at step {member.resumed_from} of {tcfg.total_steps}")
    if group.is_main:
        update_run_config(run_dir, f"train.{cfg.name}", config_to_mapping(cfg))
    return member


def _finish(cfg, run_dir: Path, manifest, folder: Path, sae, optimizer, state, scale: float, say, speed) -> dict:
    """Rank 0: evaluate the exported SAE (its evaluation weights) on held-out data, write it, drop the checkpoints."""
    device = sae.W_dec.device
    with eval_weights(sae, optimizer):
        exported = export_sae(sae, scale)
    settings = EvalSettings(heldout_contexts=cfg.heldout_contexts, lm_contexts=cfg.lm_eval_contexts)
    say(f"evaluating on {cfg.heldout_contexts} held-out contexts")
    metrics = evaluate(exported, run_dir, manifest, settings, device)
    metrics.update(
        dead_fraction=state.dead_fraction(cfg.dead_window),
        dead_window_tokens=cfg.dead_window,
        training_tokens_per_second=speed,
    )
    record = _record(cfg, manifest, scale, state, metrics, saelens_name(cfg.arch))
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
    started = time.perf_counter()
    cfg = config_from_args(TrainJobConfig, args)
    if cfg.transcoder:
        print(format_transcoder_summary(run_transcoders(cfg, say=print)))
        return 0
    summaries = run_grid(cfg, say=print)
    if is_main_process():
        grid = len(summaries) > 1
        print(format_grid_summary(summaries, time.perf_counter() - started) if grid else format_summary(summaries[0]))
    return 0
