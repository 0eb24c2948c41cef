"""`saescope features` and `saescope show`: the feature index in the terminal (or as JSON).

Peak tokens are highlighted with ANSI colours on a terminal (background
strength follows the activation) and with plain markers otherwise:
``[[token]]`` for the example's own token, ``[token]`` for other active tokens.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from typing import Literal

from jobs.options import add_config_arguments, config_from_args, counted, finite_float, option
from jobs.run import open_run
from storage.index_queries import SORT_COLUMNS, Example


def open_index(run: str, sae: str | None):
    return open_run(run, sae).index()


def _visible(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t")


def render_example(example: Example, colour: bool, max_act: float | None = None) -> str:
    """One line: the window's tokens with active ones highlighted."""
    scale = max_act or max(example.acts) or 1.0
    parts = []
    for i, (token, act) in enumerate(zip(example.tokens, example.acts, strict=True)):
        text = _visible(token)
        if act <= 0:
            parts.append(text)
        elif colour:
            level = min(5, max(1, round(5 * act / scale)))
            style = "1;30;48;5;" + str(194 + (level - 1) * 6 if level < 5 else 46)
            parts.append(f"\x1b[{style}m{text}\x1b[0m" if i != example.peak else f"\x1b[{style};4m{text}\x1b[0m")
        else:
            parts.append(f"[[{text}]]" if i == example.peak else f"[{text}]")
    return "".join(parts)


def _use_colour() -> bool:
    return sys.stdout.isatty()


@dataclass(frozen=True)
class FeaturesConfig:
    """Options of `saescope features`."""

    run: str = option(help="run directory")
    sae: str | None = option(None, "SAE name (default: the run's only SAE)")
    sort: str = option("density", "sort key", choices=tuple(SORT_COLUMNS))
    ascending: bool = option(False, "smallest first")
    only: Literal["all", "live", "dead"] = option("all", "which features to list")
    min_density: float | None = option(None, "only features at least this dense", parse=finite_float)
    max_density: float | None = option(None, "only features at most this dense", parse=finite_float)
    limit: int = option(20, "features per page", parse=counted(1))
    offset: int = option(0, "skip this many features first", parse=counted(0))
    search: str | None = option(None, "only features whose top examples or promoted tokens match")
    query: str | None = option(None, "rank features by meaning (MiniLM cosine with explanations)")
    json: bool = option(False, "print the rows as JSON")


@dataclass(frozen=True)
class ShowConfig:
    """Options of `saescope show`."""

    run: str = option(help="run directory")
    feature: int = option(help="feature id", parse=counted(0))
    sae: str | None = option(None, "SAE name (default: the run's only SAE)")
    examples: int = option(8, "top examples to print", parse=counted(1))
    intervals: bool = option(False, "also print examples from each quantile bin")
    json: bool = option(False, "print everything as JSON")


def register(subparsers) -> None:
    listing = subparsers.add_parser("features", help="list features with density, max activation and top tokens")
    add_config_arguments(listing, FeaturesConfig)
    listing.set_defaults(handler=lambda args: list_command(config_from_args(FeaturesConfig, args)))
    show = subparsers.add_parser("show", help="one feature: statistics, logit effects and top examples")
    add_config_arguments(show, ShowConfig)
    show.set_defaults(handler=lambda args: show_command(config_from_args(ShowConfig, args)))


def open_labels(run: str, sae: str | None):
    """The SAE's explanations (a reader), or None when `saescope explain` has not run on these weights."""
    return open_run(run, sae).labels()


def query_command(args) -> int:
    """`features --query`: features ranked by the cosine of the query with their explanation and top examples."""
    if not args.query.strip():
        raise ValueError('--query is empty: give a few words, e.g. --query "file paths"')
    with open_index(args.run, args.sae) as index:
        reader = open_labels(args.run, args.sae)
        if reader is None:
            raise ValueError(f"no explanations for this SAE yet: run `saescope explain --run {args.run}` first")
        from pipeline.explain.embedding import Embedder

        with reader:
            rows = reader.search(Embedder().encode([args.query])[0], limit=args.offset + args.limit)[args.offset :]
        stats = index.stats_of([row["feature"] for row in rows])
    if args.json:
        print(json.dumps([{**row, **stats[row["feature"]]} for row in rows], indent=2, default=float))
        return 0
    print(f"{'feature':>8} {'similarity':>10} {'density':>10}  explanation")
    for row in rows:
        density = stats[row["feature"]]["density"]
        print(f"{row['feature']:>8} {row['similarity']:>10.3f} {density:>10.3e}  {row['text']}")
    print(f"({len(rows)} features most similar in meaning to {args.query!r})")
    return 0


def list_command(args) -> int:
    if args.query is not None:
        return query_command(args)
    if args.min_density is not None and args.max_density is not None and args.min_density > args.max_density:
        raise ValueError(f"--min-density ({args.min_density}) is above --max-density ({args.max_density})")
    dead = {"all": None, "live": False, "dead": True}[args.only]
    with open_index(args.run, args.sae) as index:
        rows = index.list_features(
            args.sort, not args.ascending, dead, args.min_density, args.max_density, args.limit, args.offset,
            token=args.search,
        )  # fmt: skip
        if args.json:
            print(json.dumps(rows, indent=2, default=float))
            return 0
        labels = _labels([row["feature"] for row in rows], args)
        print(f"{'feature':>8} {'density':>10} {'max':>9} {'mean':>9}  top promoted tokens")
        for row in rows:
            tokens = " ".join(repr(t) for t in row["promoted"])
            state = "  (dead)" if row["dead"] else ""
            print(
                f"{row['feature']:>8} {row['density']:>10.3e} {row['max_act']:>9.3g} {row['mean_act']:>9.3g}  "
                f"{tokens}{state}"
            )
            if row["feature"] in labels:
                label = labels[row["feature"]]
                print(f"{'':>8} {_score_text(label)}  {label['text']}")
        print(f"({len(rows)} of {index.n_features} features; sorted by {args.sort})")
    return 0


def _labels(features: list[int], args) -> dict[int, dict]:
    reader = open_labels(args.run, args.sae)
    if reader is None:
        return {}
    with reader:
        return reader.labels(features)


def _score_text(label: dict) -> str:
    if label.get("auroc") is None:
        return "(unscored)"
    return f"(AUROC {label['auroc']:.2f} vs control {label['control_auroc']:.2f})"


def _explanation_lines(args) -> list[str]:
    reader = open_labels(args.run, args.sae)
    if reader is None:
        return []
    with reader:
        explanations = reader.for_feature(args.feature)
    lines = []
    for explanation in explanations:
        lines.append(f"  explanation ({explanation['explainer']}, {explanation['model']}): {explanation['text']}")
        for score in explanation["scores"]:
            control = "-" if score["control_value"] is None else f"{score['control_value']:.3f}"
            lines.append(
                f"    {score['scorer']} {score['metric']}: {score['value']:.3f}  (control {control}; "
                f"{score['n_positive']} activating / {score['n_negative']} not)"
            )
    return lines


def show_command(args) -> int:
    with open_index(args.run, args.sae) as index:
        summary = index.summary(args.feature)
        top = index.top_examples(args.feature, args.examples)
        intervals = index.interval_examples(args.feature, "quantile") if args.intervals else []
        if args.json:
            payload = {
                **summary,
                "top_examples": [dataclasses.asdict(e) for e in top],
                "quantile_bins": [{**b, "examples": [dataclasses.asdict(e) for e in b["examples"]]} for b in intervals],
            }
            print(json.dumps(payload, indent=2, default=float))
            return 0
        print("\n".join(format_feature(summary, top, intervals, _use_colour()) + _explanation_lines(args)))
    return 0


def format_feature(summary: dict, top: list[Example], intervals: list[dict], colour: bool) -> list[str]:
    f = summary["feature"]
    lines = [f"feature {f}" + ("  (dead: never active on the indexed tokens)" if summary["dead"] else "")]
    lines.append(
        f"  density {summary['density']:.3e} ({summary['n_active']:,} activations)   "
        f"max {summary['max_act']:.4g}   mean {summary['mean_act']:.4g}"
    )
    lines.append("  promotes:   " + "  ".join(f"{t!r} {v:+.3f}" for t, v in summary["promoted"]))
    lines.append("  suppresses: " + "  ".join(f"{t!r} {v:+.3f}" for t, v in summary["suppressed"]))
    lines.append("  nearest:    " + "  ".join(f"#{n} ({c:.2f})" for n, c in summary["neighbours"][:5]))
    lines.append("  top examples:")
    for example in top:
        lines.append(f"    {example.activation:8.3f}  {render_example(example, colour, summary['max_act'])}")
    for entry in intervals:
        lines.append(
            f"  activations {entry['lower']:.3g}-{entry['upper']:.3g} ({entry['n_activations']:,} in this bin):"
        )
        for example in entry["examples"]:
            lines.append(f"    {example.activation:8.3f}  {render_example(example, colour, summary['max_act'])}")
    return lines
