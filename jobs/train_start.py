"""Where a training run starts: a fresh, data-initialized SAE, or the state of its newest checkpoint.

A checkpoint is only resumed with the options it was made with (those that change
the weights); a different request is refused with the options that differ. Used by
`saescope train`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from jobs.options import ConfigError, config_to_mapping
from pipeline.runtime.distributed import SINGLE, Group
from pipeline.sae.initialization import init_sae, normalization_factor
from pipeline.sae.model import Sae, SaeConfig
from pipeline.sae.training import TrainConfig, make_optimizer, restore_state_tree
from storage.checkpoints import latest_checkpoint, load_checkpoint, remove_incomplete
from storage.constants import CHECKPOINTS_DIR, EXPLANATIONS, FEATURE_INDEX, SAE_CFG, SAE_METRICS, SAE_WEIGHTS, TRAIN_LOG
from storage.training_data import TrainingStream

INIT_SAMPLE_TOKENS = 16384
"""Activations sampled for the normalization factor and the geometric-median init of b_dec."""
NOT_AFFECTING_WEIGHTS = ("force", "checkpoint_every", "lm_eval_contexts", "device")
"""Options that do not change the trained weights, so a resumed run may differ in them."""


def weights_config(cfg) -> dict:
    return {k: v for k, v in config_to_mapping(cfg).items() if k not in NOT_AFFECTING_WEIGHTS}


def fresh_start(cfg, stream: TrainingStream, device, group: Group) -> tuple[Sae, float]:
    sample_ND = stream.sample(INIT_SAMPLE_TOKENS)
    scale = normalization_factor(sample_ND)
    shape = SaeConfig(d_in=stream.manifest.d_model, d_sae=cfg.d_sae, architecture=cfg.arch, k=cfg.k)
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


def resume(tree: dict | None, folder: Path, cfg, sae_shape: SaeConfig, device, tcfg: TrainConfig):
    """(sae, optimizer, state, scale) from a checkpoint tree, or None when there is none."""
    if tree is None:
        return None
    saved, wanted = tree["job"]["weights_config"], weights_config(cfg)
    if saved != wanted:
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {wanted.get(k)!r}" for k in changed)
        raise ConfigError(f"{folder} has a checkpoint made with other options ({detail}): repeat them, or pass --force")
    sae = Sae(sae_shape).to(device)
    optimizer = make_optimizer(sae, tcfg)
    state = restore_state_tree(tree["trainer"], sae, optimizer)
    return sae, optimizer, state, float(tree["job"]["scale"])


def delete_trained(folder: Path) -> None:
    for name in (SAE_CFG, SAE_WEIGHTS, SAE_METRICS, TRAIN_LOG, FEATURE_INDEX, EXPLANATIONS):
        (folder / name).unlink(missing_ok=True)
    shutil.rmtree(folder / CHECKPOINTS_DIR, ignore_errors=True)
