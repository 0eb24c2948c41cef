"""`saescope eval`: held-out metrics of a run's SAE (FVU, PCA baseline, L0, dead, CE-loss recovered)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from jobs.console import format_metrics
from jobs.heldout import EvalSettings, evaluate
from jobs.options import add_config_arguments, config_from_args, counted, option
from jobs.run import open_run
from pipeline.runtime.precision import resolve_device
from storage.sae_store import SaeRecord, update_cfg
from storage.training_data import default_heldout_contexts


@dataclass(frozen=True)
class EvalConfig:
    """Options of `saescope eval`."""

    run: str = option(help="run directory")
    sae: str | None = option(None, "SAE name (default: the run's only SAE)")
    lm_eval_contexts: int = option(64, "contexts for CE-loss recovered (0: skip)", parse=counted(0))
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    json: bool = option(False, "print the metrics as JSON")


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="held-out metrics of a trained or imported SAE")
    add_config_arguments(parser, EvalConfig)
    parser.set_defaults(handler=lambda args: command(config_from_args(EvalConfig, args)))


def heldout_of(cfg: dict, n_contexts: int) -> int:
    """The held-out size used in training, else the default for the cache's size."""
    training = SaeRecord(cfg).training
    return training.get("heldout_contexts") or default_heldout_contexts(n_contexts)


def command(args: EvalConfig) -> int:
    run = open_run(args.run, args.sae)
    run_dir, manifest, folder = run.folder, run.manifest, run.sae_folder
    sae, cfg = run.sae()
    device = resolve_device(args.device)
    settings = EvalSettings(heldout_contexts=heldout_of(cfg, manifest.n_contexts), lm_contexts=args.lm_eval_contexts)
    metrics = evaluate(sae.to(device), run_dir, manifest, settings, device)
    training_metrics = SaeRecord(cfg).training_metrics
    for key in ("dead_fraction", "dead_window_tokens"):
        if key in training_metrics:
            metrics[key] = training_metrics[key]
    update_cfg(folder, {"last_eval": metrics})
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{folder} ({cfg.get('architecture')}, d_sae {cfg.get('d_sae')})")
        print("\n".join(format_metrics(metrics)))
    return 0
