"""`saescope compare`: match two SAEs' features one-to-one and say how much they agree.

Both SAEs must read the same model (same weights revision) at the same hook point with the same
width, or their decoder cosines would compare directions of different spaces (refused before any
weights load, naming both): two SAEs of one run, or one of the run and ``--against RUN:NAME`` from
another run on the same model and hook. The
comparison (``pipeline.features.matching``): Hungarian matching by decoder cosine, PW-MCC beside
the same number against an untrained SAE of B's shape (the control), Pearson correlation of each
matched pair's activations on held-out tokens of the run's cache, and split families (a latent of
the smaller SAE with decoder cosine >= 0.7 to several latents of the larger). The result is saved
as ``RUN/comparisons/A__B.json`` (the dashboard's Compare page reads it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from jobs.heldout import EvalSettings, heldout_batches
from jobs.options import (
    ConfigError,
    add_config_arguments,
    check_can_create,
    check_device,
    config_from_args,
    counted,
    finite_float,
    option,
    require,
)
from jobs.run import Run, check_fits_cache, open_run
from pipeline.features.matching import (
    CONTROL_SEED,
    SPLIT_COSINE,
    Matching,
    Splits,
    control_pw_mcc,
    match_decoders,
    matched_correlation,
    mean_row_cosine,
    random_decoder,
    splits_between,
)
from pipeline.runtime.precision import resolve_device
from pipeline.sae.model import Sae
from pipeline.sae.saelens import sae_hook_point
from storage.comparisons import comparison_path, write_comparison
from storage.constants import FORMAT_VERSION
from storage.sae_store import SaeRecord, read_sae_cfg, weights_fingerprint
from storage.training_data import default_heldout_contexts

STRONG_COSINES = (0.9, 0.7)
"""Matched pairs are counted at these decoder cosines or more."""


@dataclass(frozen=True)
class CompareConfig:
    """Options of `saescope compare`."""

    run: str = option(help="run directory")
    sae: tuple[str, ...] = option((), "an SAE of the run; give two (--sae A --sae B), or at most one with --against")
    against: str | None = option(None, "compare with an SAE of another run on the same model and hook: RUN:NAME")
    heldout_tokens: int = option(
        100_000, "held-out tokens for the activation correlation of matched pairs (0: skip it)", parse=counted(0)
    )
    split_cosine: float = option(
        SPLIT_COSINE, "decoder cosine that joins a latent to a split family", parse=finite_float
    )
    control_seed: int = option(
        CONTROL_SEED, "seed of the untrained SAE of B's shape that scores the control (not a training seed of A or B)"
    )
    examples: int = option(5, "split families to print", parse=counted(0))
    device: str = option("auto", "where to encode held-out tokens: cpu, cuda, cuda:N or auto")
    save: bool = option(True, "save the comparison in RUN/comparisons/ for the dashboard's Compare page")
    json: bool = option(False, "print the comparison as JSON")

    def __post_init__(self):
        if self.against is None:
            require(len(self.sae) == 2, "give two SAEs: --sae A --sae B (or one --sae and --against RUN:NAME)")
        else:
            require(len(self.sae) <= 1, "with --against RUN:NAME give at most one --sae (the SAE of --run)")
            require(":" in self.against, f"--against {self.against!r} must be RUN:NAME, e.g. runs/other:default")
        require(len(set(self.sae)) == len(self.sae), f"--sae {self.sae[0]!r} is given twice: name two SAEs")
        require(0 < self.split_cosine <= 1, f"--split-cosine must be in (0, 1], got {self.split_cosine}")


class Side(NamedTuple):
    """One of the two SAEs: how it is named, its run and folder, its cfg.json."""

    label: str
    run: Run
    cfg: dict

    @property
    def name(self) -> str:
        return self.run.sae_folder.name


def register(subparsers) -> None:
    parser = subparsers.add_parser("compare", help="match two SAEs' features by decoder: PW-MCC beside its control")
    add_config_arguments(parser, CompareConfig)
    parser.set_defaults(handler=lambda args: command(config_from_args(CompareConfig, args)))


def _side(run: Run, label: str) -> Side:
    cfg = read_sae_cfg(run.sae_folder)
    check_fits_cache(cfg, run.manifest, run.sae_folder)
    return Side(label, run, cfg)


def open_sides(args: CompareConfig) -> tuple[Side, Side]:
    """Both SAEs, checked to read the same model and hook, before any weights are loaded."""
    a = _side(open_run(args.run, args.sae[0] if args.sae else None), "")
    if args.against is None:
        b = _side(open_run(args.run, args.sae[1]), "")
    else:
        other_run, _, other_name = args.against.rpartition(":")
        b = _side(open_run(other_run, other_name or None), args.against)
        check_same_model(a.run, b.run)
    if a.run.sae_folder.resolve() == b.run.sae_folder.resolve():
        raise ValueError(f"{a.run.sae_folder} is both SAEs: compare two different SAEs")
    check_same_space(a, b)
    if args.control_seed in (training_seed(a.cfg), training_seed(b.cfg)):
        raise ValueError(
            f"--control-seed {args.control_seed} is the seed an SAE was trained from: its own initialization is no "
            "random control; choose another --control-seed"
        )
    return a._replace(label=a.label or a.name), b._replace(label=b.label or b.name)


def _reads(side: Side) -> tuple[str, int, str]:
    """(hook point, d_in, model weights revision) the SAE reads."""
    point = sae_hook_point(side.cfg) or side.run.hook_point
    return point.name, int(side.cfg["d_in"]), side.run.manifest.model_revision


def check_same_space(a: Side, b: Side) -> None:
    """Both SAEs must read the same hook point, width and model weights (ConfigError naming both otherwise)."""
    if _reads(a) == _reads(b):
        return
    (point_a, d_a, rev_a), (point_b, d_b, rev_b) = _reads(a), _reads(b)
    model_a, model_b = f"{a.run.manifest.model_spec} {rev_a[:19]}", f"{b.run.manifest.model_spec} {rev_b[:19]}"
    raise ConfigError(
        f"SAE {a.run.sae_folder} reads {point_a} (d_in {d_a}) of {model_a} but {b.run.sae_folder} reads {point_b} "
        f"(d_in {d_b}) of {model_b}: their decoders live in different spaces; compare two SAEs of one hook point"
    )


def training_seed(cfg: dict) -> int | None:
    """The seed saescope initialized the SAE with (None for an imported SAE)."""
    seed = SaeRecord(cfg).training.get("seed")
    return int(seed) if isinstance(seed, int) else None


def kept_from_init(sae: Sae, cfg: dict) -> float | None:
    """Mean cosine of each trained decoder row with its initial row (None when the training seed is unknown)."""
    seed = training_seed(cfg)
    return None if seed is None else mean_row_cosine(sae.W_dec, random_decoder(sae.cfg, seed))


def check_same_model(run_a: Run, run_b: Run) -> None:
    """Two runs' caches must come from the same model weights at the same hook."""
    ma, mb = run_a.manifest, run_b.manifest
    if ma.model_revision != mb.model_revision:
        raise ValueError(
            f"{run_a.folder} and {run_b.folder} cache different models ({ma.model_spec} {ma.model_revision[:19]} "
            f"vs {mb.model_spec} {mb.model_revision[:19]}): compare SAEs of the same model"
        )
    if (ma.layer, ma.hook_name, ma.d_model) != (mb.layer, mb.hook_name, mb.d_model):
        raise ValueError(
            f"{run_a.folder} and {run_b.folder} cache different hooks ({ma.hook_name} vs {mb.hook_name}): "
            "compare SAEs that read the same hook"
        )


def heldout_contexts(a: Side, b: Side) -> int:
    """Contexts at the end of A's cache that neither SAE trained on (B counts only if it shares the cache)."""
    n_contexts = a.run.manifest.n_contexts
    sides = (a, b) if b.run.folder.resolve() == a.run.folder.resolve() else (a,)
    return min(SaeRecord(s.cfg).training.get("heldout_contexts") or default_heldout_contexts(n_contexts) for s in sides)


def correlate(a: Side, b: Side, sae_a: Sae, sae_b: Sae, matching: Matching, args: CompareConfig) -> dict | None:
    """Per-pair correlation on held-out tokens, with its summary; None when --heldout-tokens is 0."""
    if args.heldout_tokens == 0:
        return None
    device = resolve_device(args.device)
    settings = EvalSettings(heldout_contexts=heldout_contexts(a, b), lm_contexts=0, batch_size=2048)
    batches = (x_ND.to(device) for x_ND in heldout_batches(a.run.folder, a.run.manifest, settings))
    corr_P, n_tokens = matched_correlation(sae_a.to(device), sae_b.to(device), matching, batches, args.heldout_tokens)
    values = corr_P.numpy()
    defined = values[~np.isnan(values)]
    return {
        "n_tokens": n_tokens,
        "heldout_contexts": settings.heldout_contexts,
        "mean": float(defined.mean()) if len(defined) else None,
        "median": float(np.median(defined)) if len(defined) else None,
        "undefined": int(len(values) - len(defined)),
        "per_pair": [None if math.isnan(v) else round(float(v), 5) for v in values],
    }


def _shape(side: Side, sae: Sae) -> dict:
    cfg = sae.cfg
    return {
        "training_seed": training_seed(side.cfg),
        "cosine_with_init": kept_from_init(sae, side.cfg),
        "run": str(side.run.folder),
        "name": side.name,
        "label": side.label,
        "fingerprint": weights_fingerprint(side.run.sae_folder),
        "architecture": cfg.architecture,
        "k": cfg.k if cfg.architecture == "topk" else None,
        "d_sae": cfg.d_sae,
        "d_in": cfg.d_in,
    }


def _splits_json(splits: Splits, threshold: float) -> dict:
    families = [{"parent": f.parent, "children": list(f.children), "cosines": [round(c, 5) for c in f.cosines]}
                for f in splits.families]  # fmt: skip
    return {"parent_side": splits.parent_side, "threshold": threshold, "families": families}


def compare(a: Side, b: Side, args: CompareConfig) -> dict:
    """The whole comparison as a JSON-ready dict (timings in ``seconds``)."""
    (sae_a, _), (sae_b, _) = a.run.sae(), b.run.sae()
    W_a_FD, W_b_FD = sae_a.W_dec.detach().float(), sae_b.W_dec.detach().float()
    seconds, started = {}, time.perf_counter()
    matching = match_decoders(W_a_FD, W_b_FD)
    seconds["matching"] = time.perf_counter() - started
    control = control_pw_mcc(W_a_FD, sae_b.cfg, args.control_seed)
    seconds["control"] = time.perf_counter() - started - sum(seconds.values())
    splits = splits_between(W_a_FD, W_b_FD, args.split_cosine)
    seconds["splits"] = time.perf_counter() - started - sum(seconds.values())
    correlation = correlate(a, b, sae_a, sae_b, matching, args)
    seconds["correlation"] = time.perf_counter() - started - sum(seconds.values())
    return {
        "format_version": FORMAT_VERSION,
        "a": _shape(a, sae_a),
        "b": _shape(b, sae_b),
        "pw_mcc": matching.pw_mcc,
        "control_pw_mcc": control,
        "control_seed": args.control_seed,
        "pairs_at_least": {str(c): matching.count_at_least(c) for c in STRONG_COSINES},
        "pairs": {
            "a": matching.idx_a_P.tolist(),
            "b": matching.idx_b_P.tolist(),
            "cosine": [round(float(c), 5) for c in matching.cos_P],
        },
        "correlation": correlation,
        "splits": _splits_json(splits, args.split_cosine),
        "seconds": {key: round(value, 2) for key, value in seconds.items()},
    }


def _labels(run: Run, features: list[int]) -> dict[int, str]:
    reader = run.labels()
    if reader is None:
        return {}
    with reader:
        return {feature: row["text"] for feature, row in reader.labels(features).items()}


def _named(feature: int, labels: dict[int, str]) -> str:
    label = labels.get(feature)
    return f"#{feature}" + (f" {label!r}" if label else "")


def split_lines(result: dict, a: Side, b: Side, examples: int) -> list[str]:
    """The split-family count, sizes and the largest families, with labels where explanations exist."""
    splits = result["splits"]
    families = splits["families"]
    parent, child = (a, b) if splits["parent_side"] == "a" else (b, a)
    sizes = sorted({len(f["children"]) for f in families}, reverse=True)
    histogram = ", ".join(f"{sum(len(f['children']) == s for f in families)} of size {s}" for s in sizes)
    lines = [
        f"split families (a latent of {parent.label} with decoder cosine >= {splits['threshold']} to 2 or more "
        f"of {child.label}): {len(families)}" + (f" ({histogram})" if families else "")
    ]
    shown = families[:examples]
    parent_labels = _labels(parent.run, [f["parent"] for f in shown])
    child_labels = _labels(child.run, sorted({c for f in shown for c in f["children"]}))
    for family in shown:
        pairs = zip(family["children"], family["cosines"], strict=True)
        children = ", ".join(f"{_named(c, child_labels)} ({cos:.2f})" for c, cos in pairs)
        lines.append(f"  {parent.label} {_named(family['parent'], parent_labels)} -> {children}")
    return lines


def init_lines(result: dict) -> list[str]:
    """How much of its random initialization each decoder kept, and whether both started from the same one."""
    kept = [result[key]["cosine_with_init"] for key in ("a", "b")]
    if None in kept:
        return []
    lines = [f"decoder rows' mean cosine with their own initialization: A {kept[0]:.3f}, B {kept[1]:.3f}"]
    seed_a, seed_b = result["a"]["training_seed"], result["b"]["training_seed"]
    if seed_a == seed_b and (result["a"]["d_sae"], result["a"]["d_in"]) == (result["b"]["d_sae"], result["b"]["d_in"]):
        lines.append(f"  A and B started from the same initialization (seed {seed_a}): PW-MCC includes what both kept")
    return lines


def summary_lines(result: dict, a: Side, b: Side, examples: int) -> list[str]:
    """What `saescope compare` prints: shapes, PW-MCC beside its control, pair counts, correlation, splits."""
    lines = []
    for key, side in (("A", a), ("B", b)):
        shape = result[key.lower()]
        k = f" k={shape['k']}" if shape["k"] is not None else ""
        lines.append(f"{key}: {side.label:<12} {shape['architecture']}{k}, {shape['d_sae']:,} latents, "
                     f"d_in {shape['d_in']}  ({side.run.sae_folder})")  # fmt: skip
    n_pairs = len(result["pairs"]["a"])
    lines.append(f"matched pairs: {n_pairs:,} (every latent of the smaller SAE), by decoder cosine")
    control = f"(the same matching against an untrained SAE of B's shape, seed {result['control_seed']})"
    lines.append(f"PW-MCC {result['pw_mcc']:.3f}   control {result['control_pw_mcc']:.3f} {control}")
    lines += init_lines(result)
    at_least = ", ".join(f">= {c}: {n:,} ({n / max(n_pairs, 1):.1%})" for c, n in result["pairs_at_least"].items())
    lines.append(f"pairs with decoder cosine {at_least}")
    corr = result["correlation"]
    if corr is None:
        lines.append("activation correlation: skipped (--heldout-tokens 0)")
    elif corr["mean"] is None:
        lines.append(f"activation correlation: no pair fired on the {corr['n_tokens']:,} held-out tokens")
    else:
        silent = f"; {corr['undefined']:,} pairs with a silent latent left out" if corr["undefined"] else ""
        lines.append(f"activation correlation of matched pairs on {corr['n_tokens']:,} held-out tokens: "
                     f"mean {corr['mean']:.3f}, median {corr['median']:.3f}{silent}")  # fmt: skip
    lines += split_lines(result, a, b, examples)
    seconds = ", ".join(f"{key} {value:.1f} s" for key, value in result["seconds"].items())
    lines.append(f"took {seconds}")
    return lines


def command(args: CompareConfig) -> int:
    check_device("--device", args.device, allow_auto=True)
    a, b = open_sides(args)
    saved = comparison_path(a.run.folder, a.name, b.name, b.run.folder) if args.save else None
    if saved is not None:
        check_can_create("--run", saved.parent)
    result = compare(a, b, args)
    if saved is not None:
        write_comparison(saved, result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("\n".join(summary_lines(result, a, b, args.examples)))
    if saved is not None:
        print(f"saved {saved}")
    return 0
