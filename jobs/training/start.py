"""Where a training run starts: a fresh, data-initialized SAE, or the state of its newest checkpoint.

A checkpoint is only resumed with the options it was made with (those that change
the weights); a different request is refused with the options that differ. Used by
`saescope train` and its grids (a ``Member`` is one SAE ready for their shared loop).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs.options import ConfigError, config_to_mapping
from jobs.training.config import TrainJobConfig
from pipeline.runtime.distributed import SINGLE, Group
from pipeline.sae.initialization import init_sae, normalization_factor
from pipeline.sae.model import Sae, SaeConfig
from pipeline.sae.training import TrainConfig, TrainState, make_optimizer, restore_state_tree
from storage.checkpoints import latest_checkpoint, load_checkpoint, remove_incomplete
from storage.constants import CHECKPOINTS_DIR, EXPLANATIONS, FEATURE_INDEX
from storage.train_log import log_path, truncate_log
from storage.training_data import TrainingStream

INIT_SAMPLE_TOKENS = 16384
"""Activations sampled for the normalization factor and the geometric-median init of b_dec."""
NOT_AFFECTING_WEIGHTS = ("force", "checkpoint_every", "lm_eval_contexts", "device")
"""Options that do not change the trained weights, so a resumed run may differ in them."""


def weights_config(cfg) -> dict:
    return {k: v for k, v in config_to_mapping(cfg).items() if k not in NOT_AFFECTING_WEIGHTS}


def init_sample(stream: TrainingStream) -> tuple[torch.Tensor, float]:
    """(sample [N, D], normalization factor): read once, shared by every SAE started fresh on this stream."""
    sample_ND = stream.sample(INIT_SAMPLE_TOKENS)
    return sample_ND, normalization_factor(sample_ND)


def fresh_start(cfg, sample: tuple[torch.Tensor, float], shape: SaeConfig, device, group: Group) -> tuple[Sae, float]:
    """A data-initialized SAE of ``shape`` (seeded by ``cfg``) from ``init_sample``'s output, and its scale."""
    sample_ND, scale = sample
    sae = init_sae(shape, sample_ND * scale, cfg.seed).to(device)
    group.broadcast_(*sae.state_dict().values())  # the same start on every rank, whatever each computed
    return sae, scale


def newest_checkpoint(folder: Path, group: Group = SINGLE) -> dict | None:
    """The tree of the newest finished checkpoint (staging folders of killed runs removed first), or None."""
    if group.is_main:
        remove_incomplete(folder / CHECKPOINTS_DIR)
    group.barrier()
    newest = latest_checkpoint(folder / CHECKPOINTS_DIR) if folder.is_dir() else None
    return load_checkpoint(newest) if newest is not None else None


def saved_weights_config(saved: dict, wanted: dict) -> dict:
    """A checkpoint's options with those older versions did not record filled in: checkpoints from
    before --optimizer were Adam; from before --hook/--layer, on the cache's one point; from before
    --no-skip, skip transcoders; from before --cross-layer, not cross-layer."""
    defaults = {"optimizer": "adam", "hook": wanted.get("hook"), "layer": wanted.get("layer"), "skip": True}
    return {**defaults, "cross_layer": False, **saved}


def resume(tree: dict | None, folder: Path, cfg, sae_shape: SaeConfig, device, tcfg: TrainConfig):
    """(sae, optimizer, state, scale) from a checkpoint tree, or None when there is none."""
    if tree is None:
        return None
    wanted = weights_config(cfg)
    saved = saved_weights_config(tree["job"]["weights_config"], wanted)
    if saved != wanted:
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {wanted.get(k)!r}" for k in changed)
        raise ConfigError(f"{folder} has a checkpoint made with other options ({detail}): repeat them, or pass --force")
    sae = Sae(sae_shape).to(device)
    optimizer = make_optimizer(sae, tcfg)
    state = restore_state_tree(tree["trainer"], sae, optimizer)
    return sae, optimizer, state, float(tree["job"]["scale"])


@dataclass
class Member:
    """One SAE being trained in this job, ready for the shared loop."""

    cfg: TrainJobConfig
    """Its resolved options (no "auto" left)."""
    folder: Path
    sae: Sae
    optimizer: torch.optim.Optimizer
    state: TrainState
    scale: float
    """Normalization factor its inputs are multiplied by."""
    tcfg: TrainConfig
    resumed_from: int


def start_member(
    cfg, folder: Path, checkpoint: dict | None, shape: SaeConfig, stream: TrainingStream, device, tcfg, group, sample
) -> Member:
    """``cfg``'s SAE from its checkpoint, or fresh from ``init_sample`` (read into ``sample``, a list, once per job).

    Its train log is cut back to the checkpoint (or removed for a fresh start).
    """
    folder.mkdir(parents=True, exist_ok=True)
    resumed = resume(checkpoint, folder, cfg, shape, device, tcfg)
    if resumed is None:
        if not sample:
            sample.append(init_sample(stream))
        sae, scale = fresh_start(cfg, sample[0], shape, device, group)
        optimizer, state = make_optimizer(sae, tcfg), TrainState.fresh(cfg.d_sae, device)
        if group.is_main:
            log_path(folder).unlink(missing_ok=True)
    else:
        sae, optimizer, state, scale = resumed
        if group.is_main:
            truncate_log(folder, state.step)
    return Member(cfg, folder, sae, optimizer, state, scale, tcfg, state.step)


def discard_progress(folder: Path) -> None:
    """--force, before training: drop an interrupted run's checkpoints; a finished SAE stays readable.

    (A fresh start replaces the train log once its first batch is read: ``start_member``.)
    """
    shutil.rmtree(folder / CHECKPOINTS_DIR, ignore_errors=True)


def drop_replaced(folder: Path) -> None:
    """--force, once the new SAE is written: the old SAE's index and explanations describe other weights."""
    for name in (FEATURE_INDEX, EXPLANATIONS):
        (folder / name).unlink(missing_ok=True)
