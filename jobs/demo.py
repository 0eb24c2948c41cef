"""`saescope demo`: cache, train, index and explain on the offline defaults, reusing finished stages.

Sizes are chosen to finish in about 10-15 minutes on a 2-core laptop CPU:
200k tokens of SmolLM2-135M-Instruct layer-15 activations, a 4608-latent TopK
SAE (k=32) trained for 10 passes over them, an index of all cached tokens, and
token-explainer labels scored offline (no LLM) for every live feature.

With ``--trace`` two more stages follow: a plain transcoder (no skip path) at every
layer trained from the live model (``saescope train --transcoder --no-skip``, sizes
below), and the attribution graphs of two prompts (``saescope trace``), which the /trace
page opens. Plain, not skip: over the first 8 prompts of ``bench/trace_prompts.json``,
100k-token sets of each scored a mean unpruned replacement score of 0.46 (plain) against
0.35 (skip), on every prompt higher, although the skip set reconstructs better (all-layer
KL 1.86 vs 3.75; ``bench/trace_quality.py``). A graph traced with another set is traced
again; one traced with this set is reused. Between the two, the transcoders' latents are
indexed over the first ``DEMO_TRANSCODER_INDEX_TOKENS`` cached tokens (``saescope index
--transcoders``), so every graph node's label says what the latent reads (its top examples)
and writes (output tokens standardised per token), and dense latents are marked; a graph
traced before that index existed is traced again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from jobs import cache, explain, features, index, index_transcoders, serve, trace, train
from jobs.features import render_example
from jobs.options import add_config_arguments, config_from_args, counted, option
from jobs.training.transcoders import format_transcoder_summary, run_transcoders
from storage.constants import DEFAULT_SAE_NAME
from storage.graph_groups import graph_files, read_graph_json
from storage.index_builder import INDEX_FORMAT_VERSION, index_path
from storage.index_queries import open_sae_index
from storage.sae_store import sae_dir

DEMO_RUN = "runs/demo"
DEMO_TOKENS = 200_000
DEMO_D_SAE = 4608
DEMO_TRANSCODERS = "transcoders-plain"
DEMO_TRANSCODER_D_SAE = 2304
DEMO_TRANSCODER_TOKENS = 400_000
DEMO_TRANSCODER_BATCH = 1024
DEMO_TRANSCODER_INDEX_TOKENS = 50_000
"""A quarter of the cache: the index's top examples need breadth more than depth, and a full pass costs ~20 min."""
DEMO_PROMPTS = (("The capital of France is", "capital-of-france"), ("36+59=", "36-plus-59"))


@dataclass(frozen=True)
class DemoConfig(serve.ServeConfig):
    """Options of `saescope demo`: the run and sizes of each stage, then how to serve the result."""

    run: str = option(DEMO_RUN, "run directory")
    tokens: int = option(DEMO_TOKENS, "tokens to cache", parse=counted(1))
    d_sae: int = option(DEMO_D_SAE, "SAE latents", parse=counted(2))
    serve: bool = option(True, "serve the dashboard at the end (--no-serve stops after the last stage)")
    trace: bool = option(
        False, "also train transcoders at every layer, index them and trace two prompts (about 25-50 min more)"
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="cache, train and index on the offline default model and corpus")
    add_config_arguments(parser, DemoConfig)
    parser.set_defaults(handler=lambda args: command(config_from_args(DemoConfig, args)))


def _stage(number: int, text: str, total: int = 4) -> None:
    print(f"\n[{number}/{total}] {text}", flush=True)


def command(args: DemoConfig) -> int:
    started = time.perf_counter()
    stages = 7 if args.trace else 4
    stage = _numbered(stages)
    stage(1, f"caching {args.tokens:,} tokens of SmolLM2-135M-Instruct activations into {args.run}")
    print(cache.format_summary(cache.run_cache(cache.CacheConfig(run=args.run, tokens=args.tokens))))
    stage(2, f"training a TopK SAE (d_sae {args.d_sae}, k 32)")
    train_cfg = train.TrainJobConfig(run=args.run, d_sae=args.d_sae)
    print(train.format_summary(train.run_train(train_cfg, say=print)))
    stage(3, "indexing every feature's statistics and examples")
    folder = sae_dir(args.run, DEFAULT_SAE_NAME)
    if index_is_current(folder):
        print(f"{index_path(folder)}: index already built; nothing to do (run `saescope index` to rebuild)")
    else:
        print(index.format_summary(index.run_index(index.IndexConfig(run=args.run)), args.run))
    stage(4, "labelling every live feature (token explainer) and scoring the labels against a control")
    explained = explain.run_explain(explain.ExplainConfig(run=args.run))
    print(f"explained {explained.n_explained} features in {explained.seconds:.0f}s "
          f"({explained.n_done_before} were already done)\n{explained.report}")  # fmt: skip
    if args.trace:
        run_tracing_stages(args.run, stage)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s. A few features worth reading first:")
    print_interesting(args.run)
    print("\nlook further:")
    lines = ("features --run {run} --sort max", 'features --run {run} --query "file paths"',
             "show --run {run} --feature N", "serve --run {run}")  # fmt: skip
    for line in lines:
        print("  saescope " + line.format(run=args.run))
    if args.trace:
        print(f"  saescope serve --run {args.run}   (then /trace?graph={DEMO_PROMPTS[0][1]})")
    if not args.serve:
        return 0
    print()
    return serve.serve(Path(args.run), args.sae, args.host, args.port)


def _numbered(total: int):
    return lambda number, text: _stage(number, text, total)


def run_tracing_stages(run: str, stage) -> None:
    """Stages 5 to 7: transcoders at every layer, their index, then the demo prompts' graphs (each reused when
    done)."""
    stage(5, f"training a plain transcoder at every layer (d_sae {DEMO_TRANSCODER_D_SAE}) from the live model")
    tc_cfg = train.TrainJobConfig(
        run=run, name=DEMO_TRANSCODERS, transcoder=True, layers="all", d_sae=DEMO_TRANSCODER_D_SAE,
        tokens=DEMO_TRANSCODER_TOKENS, batch_size=DEMO_TRANSCODER_BATCH, skip=False,
    )  # fmt: skip
    print(format_transcoder_summary(run_transcoders(tc_cfg, say=print)))
    stage(6, f"indexing the transcoders' latents over the first {DEMO_TRANSCODER_INDEX_TOKENS:,} cached tokens")
    index_cfg = index.IndexConfig(run=run, transcoders=DEMO_TRANSCODERS, tokens=DEMO_TRANSCODER_INDEX_TOKENS)
    print(index_transcoders.format_summary(index_transcoders.run_transcoder_index(index_cfg), run))
    stage(7, "tracing the demo prompts through the transcoders")
    for prompt, name in DEMO_PROMPTS:
        if is_reusable(saved_graph(Path(run), name)):
            print(f"  graph {name!r} already traced: reusing it (saescope trace --name {name} --force redoes it)")
            continue
        force = bool(graph_files(Path(run), name))  # traced with another set: trace it again
        cfg = trace.TraceConfig(run=run, prompt=prompt, name=name, transcoders=DEMO_TRANSCODERS, force=force)
        print(trace.format_trace(trace.run_trace(cfg)))


def saved_graph(run: Path, name: str) -> dict | None:
    """A saved graph's document (None: no readable graph of that name)."""
    try:
        return read_graph_json(run, name)
    except ValueError:
        return None


def is_reusable(document: dict | None) -> bool:
    """Whether a saved graph was traced with the demo's set and labelled from its index (feature nodes carry
    densities)."""
    if document is None or document.get("saescope", {}).get("transcoders") != DEMO_TRANSCODERS:
        return False
    features = [n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    return all(n.get("saescope_density") is not None for n in features)


def traced_with(run: Path, name: str) -> str | None:
    """The transcoder set a saved graph was traced with (None: no readable graph of that name)."""
    document = saved_graph(run, name)
    return None if document is None else document.get("saescope", {}).get("transcoders")


def index_is_current(sae_folder) -> bool:
    """An index exists and was built from the SAE's current weights."""
    if not index_path(sae_folder).is_file():
        return False
    try:
        index = open_sae_index(sae_folder)
    except ValueError:
        return False
    with index:
        return int(index.metadata["index"].get("format_version", 1)) >= INDEX_FORMAT_VERSION


def print_interesting(run: str, count: int = 5) -> None:
    colour = features._use_colour()
    with features.open_index(run, None) as index:
        for feature in index.interesting(count):
            summary = index.summary(feature)
            example = index.top_examples(feature, 1)[0]
            promoted = " ".join(repr(t) for t, _ in summary["promoted"][:5])
            print(f"  #{feature:<5} density {summary['density']:.2e}  promotes {promoted}")
            print(f"         {render_example(example, colour, summary['max_act'])}")
