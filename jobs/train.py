"""`saescope train`: train an SAE on a run's activation cache, checkpointed and exactly resumable.

Wires storage (the cache stream, checkpoints, the artifact) to pipeline (SAE,
trainer, metrics). Re-running on an interrupted SAE resumes from its newest
checkpoint and reaches the same weights as an uninterrupted run; a finished SAE
is left alone unless --force is given (or another --name is used). With --force the old
SAE stays readable until the new one is written over it (its stale index and
explanations are dropped then), so a job that fails on the way loses nothing. A
finished SAE whose options differ from those given is refused (jobs.training.match).

Comma lists in --arch, --k, --d-sae/--expansion and --lr train a grid: every
member is an SAE in its own folder, fed the same batches from one read of the
cache (jobs.training.grid), and ends exactly where it would trained alone.

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
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from jobs.console import format_metrics, human_count
from jobs.heldout import EvalSettings, evaluate
from jobs.options import (
    ConfigError,
    add_config_arguments,
    config_from_args,
    config_to_mapping,
)
from jobs.run import check_reads_point, saelens_meta, write_sae
from jobs.torchrun import agreed_dtype, exclusive_on_main
from jobs.training.config import TrainJobConfig, grid_members, resolve, sae_shape, trainer_config
from jobs.training.cross_layer import format_cross_layer_summary, run_cross_layer
from jobs.training.grid import (
    announce,
    format_grid_summary,
    train_members,
)
from jobs.training.match import differences, given_options, refuse_if_different, sae_recorded, sae_request
from jobs.training.results import TrainSummary
from jobs.training.start import Member, discard_progress, drop_replaced, newest_checkpoint, start_member
from jobs.training.transcoders import format_transcoder_summary, run_transcoders
from pipeline.runtime.distributed import Group, from_environment, is_main_process
from pipeline.runtime.precision import resolve_device
from pipeline.sae.model import export_sae
from pipeline.sae.optimizers import eval_weights
from pipeline.sae.saelens import saelens_name
from pipeline.sae.training import (
    TrainState,
)
from storage.constants import (
    CHECKPOINTS_DIR,
    TRAIN_LOCK,
)
from storage.run_config import read_run_config, update_run_config
from storage.sae_store import SaeRecord, is_finished, load_sae_files, read_sae_cfg, sae_dir
from storage.shards import CacheManifest, activations_dir, read_manifest
from storage.training_data import StreamSpec, TrainingStream, default_heldout_contexts


def _stream(cfg: TrainJobConfig, manifest: CacheManifest) -> TrainingStream:
    heldout = (
        cfg.heldout_contexts if cfg.heldout_contexts is not None else default_heldout_contexts(manifest.n_contexts)
    )
    spec = StreamSpec(
        batch_size=cfg.batch_size, seed=cfg.seed, window_shards=cfg.window_shards, heldout_contexts=heldout
    )
    return TrainingStream(activations_dir(Path(cfg.run)), manifest, spec)


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


def run_train(
    cfg: TrainJobConfig, say: Callable[[str], None] = lambda _: None, given: frozenset[str] | None = None
) -> TrainSummary:
    """Train (or resume, or skip) the one SAE described by ``cfg``; ``say`` receives progress notes.

    ``given``: the options the user set, compared with a finished SAE's (jobs.training.match).
    """
    summaries = run_grid(cfg, say, given)
    if len(summaries) != 1:
        raise ConfigError(f"the lists in these options make a grid of {len(summaries)} SAEs: use run_grid")
    return summaries[0]


def run_grid(
    cfg: TrainJobConfig, say: Callable[[str], None] = lambda _: None, given: frozenset[str] | None = None
) -> list[TrainSummary]:
    """Train every SAE of ``cfg``'s grid (one SAE without lists) from one read of the cache; skip finished ones.

    Every check (options, finished SAEs matching ``given``, run.toml, the device) passes before
    ``--force`` deletes anything.
    """
    run_dir = Path(cfg.run)
    manifest = read_manifest(activations_dir(run_dir), check_files=True).select(cfg.layer, cfg.hook)
    members = grid_members(cfg)
    finished = [m for m in members if _is_done(m, run_dir)]
    for member in finished:
        check_reads_point(sae_dir(run_dir, member.name), manifest)
        _check_matches(member, manifest, sae_dir(run_dir, member.name), given)
    done = {m.name: _already_done(m, sae_dir(run_dir, m.name)) for m in finished}
    todo = [m for m in members if m.name not in done]
    for member in todo:
        resolve(member, manifest)  # validate shapes before touching anything
    if todo:
        read_run_config(run_dir)  # a damaged run.toml stops the job before --force deletes anything
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
    """Finished, not --force, and no interrupted retrain in it: a killed ``--force`` run leaves the old SAE
    readable beside its checkpoints, and re-running (with or without --force) continues or restarts it."""
    folder = sae_dir(run_dir, cfg.name)
    in_progress = (folder / CHECKPOINTS_DIR).is_dir() and any((folder / CHECKPOINTS_DIR).iterdir())
    return is_finished(folder) and not cfg.force and not in_progress


def _check_matches(member: TrainJobConfig, manifest: CacheManifest, folder: Path, given) -> None:
    """A finished SAE counts as this member only when the options given match its own (else ConfigError)."""
    requested = sae_request(resolve(member, manifest), member.batch_size)
    lines = differences(requested, sae_recorded(read_sae_cfg(folder)), given)
    refuse_if_different(lines, folder, "SAE")


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
        discard_progress(folder)  # the finished SAE is replaced only when the new one is written
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
    if cfg.force:
        drop_replaced(folder)  # the old weights' index and labels; before the write, so none outlives them
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
    given = given_options(TrainJobConfig, args)
    if cfg.transcoder and cfg.cross_layer:
        print(format_cross_layer_summary(run_cross_layer(cfg, say=print)))
        return 0
    if cfg.transcoder:
        print(format_transcoder_summary(run_transcoders(cfg, say=print, given=given)))
        return 0
    summaries = run_grid(cfg, say=print, given=given)
    if is_main_process():
        grid = len(summaries) > 1
        print(format_grid_summary(summaries, time.perf_counter() - started) if grid else format_summary(summaries[0]))
    return 0
