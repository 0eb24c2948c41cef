"""`saescope train --transcoder`: a transcoder per layer (skip by default, plain with ``--no-skip``), all
layers fed from one forward of the model.

Transcoders read each MLP's input and reconstruct its output. Their training data
comes straight from the live model, not from the activation cache: every step runs
the model on the next contexts of the cache's token stream (the cache's tokens are
re-used, so the corpus, packing and held-out split are the run's), captures the
input and output of every requested MLP in one forward (stopping after the deepest
layer) and gives each layer's transcoder its pair. Caching 2 hook points x 30 layers
would cost 2 x 30 x 2 x d_model bytes per token (69 KB for SmolLM2-135M in bfloat16),
more than the model's forward takes to recompute on a CPU.

Step s of epoch e reads the contexts at positions s*C..(s+1)*C of a permutation of
the training contexts seeded by (seed, e), C = batch size / context length, so a
resumed run re-reads exactly the batches it would have seen. Checkpoints hold every
layer's weights, optimizer and counters; the set is finished when ``set.json`` is
written after every layer's SAELens-format folder and the held-out evaluation.

A TopK set takes one stacked step for all layers per batch (``pipeline.sae.stacked``:
batched GEMMs over [L, N, D] inputs, one optimizer call), the same steps as one
``train_step`` per layer, which other architectures take; both write the same
per-layer checkpoints, so a set resumes on either.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs.console import human_count, progress
from jobs.options import ConfigError, config_to_mapping
from jobs.run import load_run_model, saelens_meta
from jobs.torchrun import agreed_dtype
from jobs.training.match import differences, refuse_if_different
from jobs.training.start import saved_weights_config, weights_config
from jobs.training.transcoder_eval import evaluate_set
from pipeline.lm.activations import mlp_io, mlp_io_stacked
from pipeline.lm.hook_points import parse_layers
from pipeline.lm.packing import special_mask
from pipeline.runtime.distributed import SINGLE
from pipeline.runtime.precision import resolve_device
from pipeline.sae.initialization import init_transcoder, normalization_factor
from pipeline.sae.model import SaeConfig
from pipeline.sae.optimizers import eval_weights
from pipeline.sae.schedule import auto_lr_for, default_warmup_steps
from pipeline.sae.stacked import stack_members, stackable, stacked_step, unstack_members
from pipeline.sae.training import (
    TrainConfig,
    Trainee,
    TrainState,
    default_auxk_dead_tokens,
    make_optimizer,
    restore_state_tree,
    state_tree,
    train_many,
)
from pipeline.sae.transcoder import Transcoder, export_transcoder
from pipeline.sae.transcoder_format import transcoder_cfg_dict, transcoder_tensors
from storage.checkpoints import latest_checkpoint, load_checkpoint, remove_incomplete, save_checkpoint
from storage.constants import CHECKPOINTS_DIR, TRAIN_LOCK, TRANSCODER_SET
from storage.locks import exclusive
from storage.sae_store import save_sae
from storage.shards import CacheManifest, activations_dir, load_tokens, read_manifest
from storage.training_data import default_heldout_contexts, heldout_range
from storage.transcoder_store import layer_dir, read_set, set_dir, write_set

TRANSCODER_ARCHITECTURES = ("topk", "batchtopk")


@dataclass(frozen=True)
class TranscoderPlan:
    """Everything resolved before the model loads."""

    folder: Path
    layers: tuple[int, ...]
    d_sae: int
    contexts_per_step: int
    steps: int
    heldout_contexts: int
    train_contexts: int


@dataclass(frozen=True)
class TranscoderSummary:
    folder: Path
    plan: TranscoderPlan
    record: dict
    already_done: bool
    resumed_from: int
    seconds: float


def plan(cfg, manifest: CacheManifest) -> TranscoderPlan:
    """Check the options against the cache (ConfigError naming the option) and size the job."""
    if isinstance(cfg.arch, tuple) or cfg.arch not in TRANSCODER_ARCHITECTURES:
        raise ConfigError(
            f"--arch {cfg.arch!r}: transcoders are trained as one of {', '.join(TRANSCODER_ARCHITECTURES)}"
        )
    for option in ("k", "d_sae", "expansion", "lr"):
        if isinstance(getattr(cfg, option), tuple):
            raise ConfigError(f"--{option.replace('_', '-')} takes one value with --transcoder (grids train SAEs)")
    n_layers = int(manifest.provenance["model"]["n_layers"])
    try:
        layers = parse_layers(cfg.layers or "all", n_layers)
    except ValueError as error:
        raise ConfigError(f"--layers: {error}") from error
    d_sae = cfg.d_sae or cfg.expansion * manifest.d_model
    if not 0 < cfg.k < d_sae:
        raise ConfigError(f"--k ({cfg.k}) must be between 1 and d_sae - 1 ({d_sae - 1})")
    heldout = (
        cfg.heldout_contexts if cfg.heldout_contexts is not None else default_heldout_contexts(manifest.n_contexts)
    )
    train_contexts = manifest.n_contexts - heldout
    per_step = max(1, cfg.batch_size // manifest.ctx_len)
    if train_contexts < per_step:
        raise ConfigError(
            f"the cache holds {train_contexts} training contexts, fewer than one batch of {per_step}: "
            "lower --batch-size or cache more tokens"
        )
    tokens = cfg.tokens or (train_contexts // per_step) * per_step * manifest.ctx_len
    steps = max(1, tokens // (per_step * manifest.ctx_len))
    folder = set_dir(Path(cfg.run), cfg.name)
    return TranscoderPlan(folder, layers, d_sae, per_step, steps, heldout, train_contexts)


def trainer_config(cfg, p: TranscoderPlan, compute_dtype: torch.dtype, tokens_per_step: int) -> TrainConfig:
    return TrainConfig(
        total_steps=p.steps,
        lr=cfg.lr or auto_lr_for(transcoder_optimizer(cfg), p.d_sae, p.steps),
        optimizer=transcoder_optimizer(cfg),
        warmup_steps=cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup_steps(p.steps),
        decay_fraction=cfg.decay_fraction,
        auxk_coef=cfg.auxk_coef,
        auxk_dead_tokens=default_auxk_dead_tokens(p.steps * tokens_per_step, tokens_per_step),
        compute_dtype=compute_dtype,
        log_every=max(1, min(25, p.steps // 50)),
        checkpoint_every=cfg.checkpoint_every or max(10, p.steps // 10),
    )


def transcoder_optimizer(cfg) -> str:
    """ "auto" is schedule-free signum here: on layers 0, 15 and 29 of the demo model (61k tokens, d_sae 2304)
    it reached a lower MLP-output FVU than Adam at every layer (0.118/0.368/0.093 vs 0.131/0.403/0.097)."""
    return "signum-sf" if cfg.optimizer == "auto" else cfg.optimizer


def training_tokens(folder: Path, manifest: CacheManifest) -> torch.Tensor:
    """Every context of the cache as token ids [C, T] (only the tokens tensor of each shard is read)."""
    return torch.cat([load_tokens(folder, record) for record in manifest.shards]).long()


class ContextBatches:
    """Step s -> the ids [C, T] and ordinary-position mask of its contexts (see the module docstring)."""

    def __init__(self, tokens_CT: torch.Tensor, train_contexts: int, per_step: int, seed: int, special: tuple):
        self.tokens_CT, self.n, self.per_step, self.seed, self.special = (
            tokens_CT,
            train_contexts,
            per_step,
            seed,
            special,
        )
        self.steps_per_epoch = train_contexts // per_step

    def contexts(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        ids = self.tokens_CT[order[within * self.per_step : (within + 1) * self.per_step]]
        return ids, ~special_mask(ids, self.special)


def mlp_io_stream(model, batches: ContextBatches, layers, first: int, device) -> Iterator[dict]:
    step = first
    while True:
        ids, ordinary = batches.contexts(step)
        yield mlp_io(model, ids.to(device), layers, ordinary.to(device))
        step += 1


def _fresh(cfg, p: TranscoderPlan, first: dict, d_model: int, device) -> tuple[dict, dict]:
    """Transcoders initialized on the first batch, and their (input, output) normalization factors."""
    shape = SaeConfig(d_model, p.d_sae, cfg.arch, cfg.k)
    tcs, scales = {}, {}
    for layer in p.layers:
        x, y = first[layer]
        s_in, s_out = normalization_factor(x.cpu()), normalization_factor(y.cpu())
        tcs[layer] = init_transcoder(shape, (y * s_out).cpu(), cfg.seed + layer, skip=cfg.skip).to(device)
        scales[layer] = (s_in, s_out)
    return tcs, scales


def _resume(tree: dict, cfg, p: TranscoderPlan, d_model: int, tcfg: TrainConfig, device):
    wanted = weights_config(cfg)
    if saved_weights_config(tree["job"]["weights_config"], wanted) != wanted:
        raise ConfigError(
            f"{p.folder} holds an interrupted set trained with other options: use the same options, "
            "or --force to start again"
        )
    shape = SaeConfig(d_model, p.d_sae, cfg.arch, cfg.k)
    trainees, scales = {}, {}
    for layer in p.layers:
        tc = Transcoder(shape, skip=cfg.skip).to(device)
        opt = make_optimizer(tc, tcfg)
        state = restore_state_tree(tree["layers"][str(layer)], tc, opt)
        trainees[layer] = (tc, opt, state)
        scales[layer] = tuple(float(s) for s in tree["scales"][str(layer)])
    return trainees, scales


def run_transcoders(cfg, say=print, given: frozenset[str] | None = None) -> TranscoderSummary:
    """Train (or resume, or skip) the transcoder set of ``cfg``: validated before the model loads.

    A finished set is skipped only when it matches the options ``given`` (jobs.training.match).
    ``--force`` deletes the old set only once the options, the device, the model and the
    cache's tokens are known good.
    """
    run_dir = Path(cfg.run)
    manifest = read_manifest(activations_dir(run_dir), check_files=True)
    p = plan(cfg, manifest)
    if (p.folder / TRANSCODER_SET).is_file() and not cfg.force:
        record = read_set(p.folder)
        refuse_if_different(differences(_set_request(cfg, p), _set_recorded(record), given), p.folder, "set")
        return TranscoderSummary(p.folder, p, record, True, 0, 0.0)
    device = resolve_device(cfg.device)
    with exclusive(p.folder / TRAIN_LOCK, f"transcoder set {cfg.name!r} of {run_dir}"):
        return _train(cfg, run_dir, manifest, p, say, device)


def _set_request(cfg, p: TranscoderPlan) -> dict:
    return {**config_to_mapping(cfg), "layers": list(p.layers), "d_sae": p.d_sae}


def _set_recorded(record: dict) -> dict:
    """What a finished set was trained with (its options as given, its layers and width as resolved)."""
    training = record.get("training") if isinstance(record.get("training"), dict) else {}
    recorded = {"skip": True, **training, "layers": list(record["layers"])}  # sets before --no-skip had W_skip
    if "d_sae" in record:
        recorded["d_sae"] = record["d_sae"]
    return recorded


def _clear(folder: Path) -> None:
    """--force: everything of the old set but the lock (called once every input is known good)."""
    for child in folder.iterdir():
        if child.name != TRAIN_LOCK:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def _train(cfg, run_dir: Path, manifest: CacheManifest, p: TranscoderPlan, say, device) -> TranscoderSummary:
    # the model computes in the cache's dtype, for training data and evaluation alike
    stream_model = load_run_model(manifest, device).model.to(getattr(torch, manifest.model_dtype))
    batches = ContextBatches(
        training_tokens(activations_dir(run_dir), manifest),
        p.train_contexts,
        p.contexts_per_step,
        cfg.seed,
        manifest.special_token_ids,
    )
    if cfg.force:
        _clear(p.folder)
    remove_incomplete(p.folder / CHECKPOINTS_DIR)
    newest = latest_checkpoint(p.folder / CHECKPOINTS_DIR)
    tree = load_checkpoint(newest) if newest else None
    requested = tree["job"]["dtype"] if tree else cfg.dtype
    compute = agreed_dtype(SINGLE, requested, device)
    tokens_per_step = p.contexts_per_step * manifest.ctx_len
    tcfg = trainer_config(cfg, p, compute.dtype, tokens_per_step)
    first_step = 0
    if tree:
        members, scales = _resume(tree, cfg, p, manifest.d_model, tcfg, device)
        first_step = min(state.step for _, _, state in members.values())
        say(f"resuming transcoder set {cfg.name!r} from its checkpoint at step {first_step} of {p.steps}")
    else:
        tcs, scales = _fresh(
            cfg, p, next(mlp_io_stream(stream_model, batches, p.layers, 0, device)), manifest.d_model, device
        )
        members = {
            layer: (tc, make_optimizer(tc, tcfg), TrainState.fresh(p.d_sae, device)) for layer, tc in tcs.items()
        }
    say(
        f"training {len(p.layers)} transcoders (d_sae {p.d_sae}, {cfg.arch} k {cfg.k}) on "
        f"{human_count(p.steps * tokens_per_step)} tokens from the live model, SAE compute in {compute.name}"
    )
    started = time.perf_counter()
    _train_loop(cfg, p, members, scales, tcfg, batches, stream_model, first_step, compute.name, device)
    seconds = time.perf_counter() - started
    exported = {layer: _exported(tc, opt, scales[layer]) for layer, (tc, opt, _) in members.items()}
    say(f"evaluating {len(exported)} transcoders on held-out contexts")
    first_heldout, _ = heldout_range(manifest, p.heldout_contexts)
    heldout = training_tokens(activations_dir(run_dir), manifest)[first_heldout:]
    metrics = evaluate_set(stream_model, exported, heldout, manifest.special_token_ids, cfg.lm_eval_contexts)
    record = _save(cfg, run_dir, manifest, p, exported, members, scales, metrics, seconds)
    shutil.rmtree(p.folder / CHECKPOINTS_DIR, ignore_errors=True)
    return TranscoderSummary(p.folder, p, record, False, first_step, seconds)


def _train_loop(cfg, p, members, scales, tcfg, batches, model, first_step, dtype_name, device) -> None:
    tokens_per_step = p.contexts_per_step * batches.tokens_CT.shape[1]
    bar = progress(p.steps * tokens_per_step, f"train {len(members)} transcoders", initial=first_step * tokens_per_step)

    def show(stats, state):
        bar.update(state.step * tokens_per_step - bar.n)
        bar.set_postfix(fvu=f"{stats.fvu:.3f}", l0=f"{stats.l0:.1f}", refresh=False)

    def checkpoint(step):
        tree = {
            "job": {"weights_config": weights_config(cfg), "dtype": dtype_name},
            "layers": {str(L): state_tree(*members[L]) for L in p.layers},
            "scales": {str(L): list(scales[L]) for L in p.layers},
        }
        save_checkpoint(p.folder / CHECKPOINTS_DIR, step, tree)

    with bar:
        if _stacks(members, p, tokens_per_step):
            _train_stacked(p, members, scales, tcfg, batches, model, device, show, checkpoint)
        else:
            _train_per_layer(p, members, scales, tcfg, batches, model, first_step, device, show, checkpoint)


STACKED_MAX_PRE_BYTES = 4 << 30
"""The stacked step holds every layer's pre-activations [L, N, F] at once (twice with AuxK); above this
many bytes (float32 count) the set trains layer by layer instead."""


def _stacks(members: dict, p: TranscoderPlan, tokens_per_step: int) -> bool:
    """Whether the stacked step (pipeline.sae.stacked) trains this set: topk skip transcoders at one step,
    pre-activations within ``STACKED_MAX_PRE_BYTES``."""
    tc = members[p.layers[0]][0]
    steps = {state.step for _, _, state in members.values()}
    fits = len(p.layers) * tokens_per_step * p.d_sae * 4 <= STACKED_MAX_PRE_BYTES
    return stackable(tc.cfg, tc.W_skip is not None) is None and len(steps) == 1 and fits


def _train_stacked(p, members, scales, tcfg, batches, model, device, show, checkpoint) -> None:
    """Every layer in one stacked step per batch: the steps ``train_many`` would take, layer by layer.

    Checkpoints hold the per-layer trees (``members`` is refreshed from the stack before each
    and at the end), so a set resumes on either path.
    """
    tcs, optimizer, state = stack_members([members[L] for L in p.layers], tcfg)
    layer_scales = [scales[L] for L in p.layers]

    def write_back():
        for layer, member in zip(p.layers, unstack_members(tcs, optimizer, state, tcfg), strict=True):
            members[layer] = member

    while state.step < tcfg.total_steps:
        ids, ordinary = batches.contexts(state.step)
        x_LND, y_LND = mlp_io_stacked(model, ids.to(device), p.layers, ordinary.to(device), layer_scales)
        stats = stacked_step(tcs, optimizer, x_LND, y_LND, state, tcfg)
        is_last = state.step == tcfg.total_steps
        if state.step % tcfg.log_every == 0 or is_last:
            show(stats[-1], state)
        if tcfg.checkpoint_every and (state.step % tcfg.checkpoint_every == 0 or is_last):
            write_back()
            checkpoint(state.step)
    write_back()


def _train_per_layer(p, members, scales, tcfg, batches, model, first_step, device, show, checkpoint) -> None:
    """One ``train_step`` per layer per batch (``train_many``): any architecture, layers at any step."""

    def on_log(layer):
        return (lambda stats, state: show(stats, state)) if layer == p.layers[-1] else None

    def on_checkpoint(layer):
        return (lambda state, _opt: checkpoint(state.step)) if layer == p.layers[-1] else None

    trainees = [
        Trainee(tc, opt, state, tcfg, on_log(layer), on_checkpoint(layer), pick=_picker(layer, scales[layer]))
        for layer, (tc, opt, state) in members.items()
    ]
    train_many(trainees, mlp_io_stream(model, batches, p.layers, first_step, device), first_step)


def _exported(tc: Transcoder, optimizer, scale: tuple[float, float]) -> Transcoder:
    """The inference copy at the optimizer's evaluation weights (schedule-free: the averaged sequence)."""
    with eval_weights(tc, optimizer):
        return export_transcoder(tc, *scale)


def _picker(layer: int, scale: tuple[float, float]):
    s_in, s_out = scale
    return lambda batch: (batch[layer][0] * s_in, batch[layer][1] * s_out)


def _save(cfg, run_dir, manifest, p, exported, members, scales, metrics, seconds) -> dict:
    meta = saelens_meta(manifest)
    for layer, tc in exported.items():
        state = members[layer][2]
        record = {
            "format_version": 1,
            "trained_architecture": cfg.arch,
            "model": manifest.provenance["model"],
            "normalization": {"input_factor": scales[layer][0], "output_factor": scales[layer][1], "folded": True},
            "training": {**config_to_mapping(cfg), "steps": state.step, "tokens_trained": state.tokens_seen},
            "metrics": metrics["layers"][layer],
        }
        save_sae(layer_dir(p.folder, layer), transcoder_tensors(tc), transcoder_cfg_dict(tc, layer, meta, record))
    record = {
        "format_version": 1,
        "layers": list(p.layers),
        "d_sae": p.d_sae,
        "architecture": cfg.arch,
        "k": cfg.k,
        "model": manifest.provenance["model"],
        "training": {
            **config_to_mapping(cfg),
            "heldout_contexts": p.heldout_contexts,
            "steps": p.steps,
            "seconds": round(seconds, 1),
        },
        "metrics": {"all_layers": metrics["all_layers"], "layers": {str(k): v for k, v in metrics["layers"].items()}},
    }
    write_set(p.folder, record)
    return record


def format_transcoder_summary(summary: TranscoderSummary) -> str:
    record = summary.record
    if summary.already_done:
        head = f"{summary.folder}: already trained; nothing to do (use --force to retrain, or --name for another set)"
    else:
        resumed = f", resumed from step {summary.resumed_from}" if summary.resumed_from else ""
        head = f"trained {len(record['layers'])} transcoders in {summary.seconds:.0f}s{resumed}"
    lines = [head, f"  {'layer':>5} {'FVU':>7} {'L0':>6} {'dead %':>7} {'CE rec.':>8} {'KL':>7}"]
    for layer, m in sorted(record["metrics"]["layers"].items(), key=lambda kv: int(kv[0])):
        ce = m.get("ce_loss_recovered")
        kl = m.get("kl_spliced")
        lines.append(
            f"  {int(layer):>5} {m['fvu']:>7.3f} {m['l0']:>6.1f} {100 * m['dead_fraction_heldout']:>7.1f} "
            f"{'-' if ce is None else f'{ce:.3f}':>8} {'-' if kl is None else f'{kl:.3f}':>7}"
        )
    every = record["metrics"]["all_layers"]
    if every:
        lines.append(
            f"  all {len(record['layers'])} layers replaced at once: "
            f"CE-loss recovered {every['ce_loss_recovered']:.3f}, KL {every['kl_spliced']:.3f}, "
            f"CE {every['ce_clean']:.3f} -> {every['ce_spliced']:.3f}"
        )
    lines.append(f"  saved {summary.folder}")
    lines.append(_next_step(summary))
    return "\n".join(lines)


def _next_step(summary: TranscoderSummary) -> str:
    """`trace` when the set covers every layer of the model (tracing needs them all), else how to train them."""
    run = Path(summary.folder).parent.parent
    n_layers = (summary.record.get("model") or {}).get("n_layers")
    if n_layers is None or len(summary.record["layers"]) >= int(n_layers):
        return f"next: saescope trace --run {run} --prompt 'The capital of France is'"
    name = Path(summary.folder).name
    return (
        f"next: `saescope trace` needs a transcoder at every one of the model's {n_layers} layers: "
        f"saescope train --run {run} --transcoder --name {name} --layers all --force"
    )
