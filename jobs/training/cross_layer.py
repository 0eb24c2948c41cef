"""`saescope train --transcoder --cross-layer`: one cross-layer transcoder over every layer, from the live model.

Shape legend: L layers, N tokens, D d_model.

The data are the per-layer transcoders' (``jobs.training.transcoders``): each step runs the
model on the next contexts of the cache's token stream and captures every layer's MLP input
and output in one forward; each layer is normalized by its factors on the first batch
(``layer_scales``). ``pipeline.sae.cross_layer_training.train_clt`` takes the steps; the CLT is
exported to raw units at the optimizer's evaluation weights (``export_clt``: a BatchTopK CLT
becomes JumpReLU), evaluated on the held-out contexts (FVU and L0 of every layer's MLP output)
and published in circuit-tracer's cross-layer layout (``jobs.import_transcoders.publish_clt``).
Width: ``--d-sae``, else ``DEFAULT_EXPANSION`` x d_model (2304 on SmolLM2-135M, about 13 GiB to
train in float32: see ``pipeline.sae.cross_layer``); ``--expansion`` is not read.
Checkpoints (weights, optimizer, counters, RNG, the normalization factors) go to
``transcoders/.NAME.checkpoints/`` (outside the set, which is published whole at the end): a
killed run started again with the same options resumes from the newest one to the same
weights; ``--force`` starts afresh.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import torch

from jobs.console import human_count, progress
from jobs.import_transcoders import publish_clt
from jobs.options import ConfigError, config_to_mapping
from jobs.run import load_run_model
from jobs.torchrun import agreed_dtype
from jobs.training.start import saved_weights_config, weights_config
from jobs.training.transcoders import ContextBatches, mlp_io_stream, plan, trainer_config, training_tokens
from pipeline.lm.activations import mlp_io
from pipeline.lm.packing import special_mask
from pipeline.runtime.distributed import SINGLE
from pipeline.runtime.precision import resolve_device
from pipeline.sae.cross_layer import (
    DEFAULT_EXPANSION,
    TRAINABLE_CLT_ARCHITECTURES,
    CltConfig,
    CrossLayerTranscoder,
    export_clt,
    init_clt,
)
from pipeline.sae.cross_layer_training import (
    clt_eval_weights,
    clt_state_tree,
    layer_scales,
    make_clt_optimizer,
    restore_clt_state_tree,
    stack_batch,
    train_clt,
)
from storage.checkpoints import latest_checkpoint, load_checkpoint, remove_incomplete, save_checkpoint
from storage.constants import TRANSCODER_SET
from storage.locks import exclusive
from storage.shards import activations_dir, read_manifest
from storage.training_data import heldout_range
from storage.transcoder_store import transcoders_dir


def clt_plan(cfg, manifest):
    """The per-layer plan with every layer and the CLT's default width (ConfigError naming the option)."""
    if cfg.arch not in TRAINABLE_CLT_ARCHITECTURES:
        raise ConfigError(f"--arch {cfg.arch!r}: a cross-layer transcoder trains as one of "
                          f"{', '.join(TRAINABLE_CLT_ARCHITECTURES)}")  # fmt: skip
    n_layers = int(manifest.provenance["model"]["n_layers"])
    if cfg.layers not in (None, "all") and cfg.layers != f"0-{n_layers - 1}":
        raise ConfigError(f"--layers {cfg.layers!r}: a cross-layer transcoder spans every layer (leave --layers out)")
    d_sae = cfg.d_sae or DEFAULT_EXPANSION * manifest.d_model
    return plan(dataclasses.replace(cfg, d_sae=d_sae, layers="all"), manifest)


@torch.no_grad()
def heldout_metrics(model, clt, tokens_CT: torch.Tensor, special: tuple, per_step: int, device) -> dict:
    """FVU and L0 of every layer's MLP output on the held-out contexts, and over all layers."""
    L = clt.cfg.n_layers
    error_L, sum_LD, square_L, active_L, n = torch.zeros(L), 0.0, torch.zeros(L), torch.zeros(L), 0
    for start in range(0, tokens_CT.shape[0], per_step):
        ids = tokens_CT[start : start + per_step].to(device)
        batch = mlp_io(model, ids, tuple(range(L)), (~special_mask(ids, special)).to(device))
        x_LND, y_LND = stack_batch(batch, L)
        error_L += (clt.reconstruct(x_LND) - y_LND).pow(2).sum((1, 2)).cpu()
        sum_LD = sum_LD + y_LND.sum(1).cpu()
        square_L += y_LND.pow(2).sum((1, 2)).cpu()
        active_L += (clt.encode(x_LND) > 0).sum((1, 2)).float().cpu()
        n += x_LND.shape[1]
    variance_L = (square_L - (sum_LD**2).sum(1) / max(n, 1)).clamp_min(1e-12)
    layers = {
        str(i): {"fvu": float(error_L[i] / variance_L[i]), "l0": float(active_L[i] / max(n, 1))} for i in range(L)
    }
    return {"fvu": float(error_L.sum() / variance_L.sum()), "n_tokens": n, "layers": layers}


def run_cross_layer(cfg, say=print) -> dict:
    """Train, export, evaluate and publish the CLT of ``cfg``; returns its set.json record."""
    run_dir = Path(cfg.run)
    manifest = read_manifest(activations_dir(run_dir), check_files=True)
    p = clt_plan(cfg, manifest)
    if (p.folder / TRANSCODER_SET).is_file() and not cfg.force:
        raise ConfigError(f"{run_dir} already has a transcoder set named {cfg.name!r}: pass --name or --force")
    device = resolve_device(cfg.device)
    with exclusive(transcoders_dir(run_dir) / f".{cfg.name}.lock", f"transcoder set {cfg.name!r} of {run_dir}"):
        return _train(cfg, run_dir, manifest, p, say, device)


def checkpoints_dir(run_dir: Path, name: str) -> Path:
    return transcoders_dir(run_dir) / f".{name}.checkpoints"


def _start(cfg, p, d_model: int, tcfg, model, batches, tree: dict | None, device):
    """(clt, optimizer, state or None, scales, batch iterator): fresh on the first batch, or from a checkpoint."""
    L = len(p.layers)
    shape = CltConfig(L, d_model, p.d_sae, cfg.arch, cfg.k, skip=cfg.skip)
    if tree is not None:
        clt = CrossLayerTranscoder(shape).to(device)
        optimizer = make_clt_optimizer(clt, tcfg)
        state = restore_clt_state_tree(tree["clt"], clt, optimizer)
        scales = tuple(torch.tensor(s, dtype=torch.float32) for s in tree["scales"])
        return clt, optimizer, state, scales, mlp_io_stream(model, batches, p.layers, state.step, device)
    stream = mlp_io_stream(model, batches, p.layers, 0, device)
    first = next(stream)
    scales = layer_scales({layer: (x.cpu(), y.cpu()) for layer, (x, y) in first.items()}, L)
    _, y_LND = stack_batch(first, L, scales)
    clt = init_clt(shape, y_LND.cpu(), cfg.seed).to(device)
    return clt, make_clt_optimizer(clt, tcfg), None, scales, _with_first(first, stream)


def _checkpoint_tree(cfg, folder: Path, force: bool) -> dict | None:
    """The newest checkpoint of an interrupted run with these options, or None (``force``: checkpoints removed)."""
    if force:
        shutil.rmtree(folder, ignore_errors=True)
        return None
    remove_incomplete(folder)
    newest = latest_checkpoint(folder) if folder.is_dir() else None
    if newest is None:
        return None
    tree = load_checkpoint(newest)
    wanted = weights_config(cfg)
    if saved_weights_config(tree["job"]["weights_config"], wanted) != wanted:
        raise ConfigError(f"{folder} holds an interrupted cross-layer transcoder trained with other options: use the "
                          "same options, or --force to start again")  # fmt: skip
    return tree


def _train(cfg, run_dir: Path, manifest, p, say, device) -> dict:
    model = load_run_model(manifest, device).model.to(getattr(torch, manifest.model_dtype))
    tokens_CT = training_tokens(activations_dir(run_dir), manifest)
    batches = ContextBatches(tokens_CT, p.train_contexts, p.contexts_per_step, cfg.seed, manifest.special_token_ids)
    folder = checkpoints_dir(run_dir, cfg.name)
    tree = _checkpoint_tree(cfg, folder, cfg.force)
    compute = agreed_dtype(SINGLE, tree["job"]["dtype"] if tree else cfg.dtype, device)  # a resumed run keeps its dtype
    tokens_per_step = p.contexts_per_step * manifest.ctx_len
    tcfg = dataclasses.replace(trainer_config(cfg, p, compute.dtype, tokens_per_step), l0_coef=cfg.l0_coef)
    clt, optimizer, state, scales, stream = _start(cfg, p, manifest.d_model, tcfg, model, batches, tree, device)
    if state is not None:
        say(f"resuming the cross-layer transcoder {cfg.name!r} from its checkpoint at step {state.step} of {p.steps}")
    say(f"training a cross-layer transcoder over {len(p.layers)} layers (d_sae {p.d_sae} per layer, {cfg.arch} k "
        f"{cfg.k}) on {human_count(p.steps * tokens_per_step)} tokens from the live model, compute in "
        f"{compute.name}")  # fmt: skip

    def checkpoint(state, optimizer):
        job = {"weights_config": weights_config(cfg), "dtype": compute.name}
        tree = {"job": job, "clt": clt_state_tree(clt, optimizer, state), "scales": [s.tolist() for s in scales]}
        save_checkpoint(folder, state.step, tree)

    started = time.perf_counter()
    first = 0 if state is None else state.step
    with progress(p.steps * tokens_per_step, "train CLT", initial=first * tokens_per_step) as bar:

        def show(stats, state):
            bar.update(state.step * tokens_per_step - bar.n)
            bar.set_postfix(fvu=f"{stats.fvu:.3f}", l0=f"{stats.l0:.1f}", refresh=False)

        result = train_clt(clt, stream, tcfg, scales, state, optimizer, on_log=show, on_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    with clt_eval_weights(clt, optimizer):
        exported = export_clt(clt, scales[0], scales[1])
    first_heldout, _ = heldout_range(manifest, p.heldout_contexts)
    say(f"evaluating the CLT on {p.heldout_contexts} held-out contexts")
    metrics = heldout_metrics(model.float(), exported.to(device), tokens_CT[first_heldout:],
                              manifest.special_token_ids, p.contexts_per_step, device)  # fmt: skip
    record = {"format_version": 1, "trained_architecture": cfg.arch, "model": manifest.provenance["model"]["name"],
              "k": cfg.k, "metrics": metrics,
              "normalization": {"input_factors": scales[0].tolist(), "output_factors": scales[1].tolist()},
              "training": {**config_to_mapping(cfg), "steps": result.state.step, "resumed_from": first,
                           "tokens_trained": result.state.tokens_seen, "seconds": round(seconds, 1)}}  # fmt: skip
    publish_clt(run_dir, cfg.name, exported.cpu(), record, manifest)
    shutil.rmtree(folder, ignore_errors=True)
    return {**record, "folder": str(p.folder), "layers": list(p.layers), "d_sae": p.d_sae}


def _with_first(first: dict, rest):
    yield first
    yield from rest


def format_cross_layer_summary(record: dict) -> str:
    metrics = record["metrics"]
    lines = [f"trained a cross-layer transcoder over {len(record['layers'])} layers (d_sae {record['d_sae']} per layer)"
             f" in {record['training']['seconds']:.0f}s", f"  {'layer':>5} {'FVU':>7} {'L0':>6}"]  # fmt: skip
    for layer, m in sorted(metrics["layers"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"  {int(layer):>5} {m['fvu']:>7.3f} {m['l0']:>6.1f}")
    lines.append(f"  all layers: FVU {metrics['fvu']:.3f} on {metrics['n_tokens']} held-out tokens")
    lines.append(f"  saved {record['folder']}")
    run = Path(record["folder"]).parent.parent
    name = Path(record["folder"]).name
    lines.append(f"next: saescope trace --run {run} --transcoders {name} --prompt 'The capital of France is'")
    return "\n".join(lines)
