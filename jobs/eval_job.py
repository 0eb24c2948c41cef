"""`saescope eval`: held-out metrics of a run's SAE (FVU, PCA baseline, L0, dead, CE-loss recovered)."""

from __future__ import annotations

import json
from pathlib import Path

from jobs.config import counted
from jobs.evaluation import EvalSettings, evaluate
from jobs.sae_io import read_sae
from jobs.train_job import format_metrics
from pipeline.precision import resolve_device
from storage.sae_store import resolve_sae, update_cfg
from storage.shards import activations_dir, read_manifest
from storage.training_data import default_heldout_contexts


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="held-out metrics of a trained or imported SAE")
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--sae", default=None, help="SAE name (default: the run's only SAE)")
    parser.add_argument(
        "--lm-eval-contexts", type=counted(0), default=64, help="contexts for CE-loss recovered (0: skip)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(handler=command)


def heldout_of(cfg: dict, n_contexts: int) -> int:
    """The held-out size used in training, else the default for the cache's size."""
    training = cfg.get("saescope", {}).get("training", {})
    return training.get("heldout_contexts") or default_heldout_contexts(n_contexts)


def command(args) -> int:
    run_dir = Path(args.run)
    manifest = read_manifest(activations_dir(run_dir))
    folder = resolve_sae(run_dir, args.sae)
    sae, cfg = read_sae(folder)
    device = resolve_device(args.device)
    settings = EvalSettings(heldout_contexts=heldout_of(cfg, manifest.n_contexts), lm_contexts=args.lm_eval_contexts)
    metrics = evaluate(sae.to(device), run_dir, manifest, settings, device)
    training_metrics = cfg.get("saescope", {}).get("metrics", {})
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
