"""Graph quality of a run's transcoder sets: mean replacement and completeness scores over a fixed prompt set.

For each finished transcoder set of ``--run`` (or those named by ``--sets``), every prompt of
``bench/trace_prompts.json`` (the two demo prompts and 22 more: facts, arithmetic, code,
grammar, sequences, three other languages) is traced exactly as `saescope trace` traces it
(float32, BOS and special tokens as constants, ``--max-feature-nodes`` as given), pruned with
the default thresholds, and scored by circuit-tracer's definitions (``pipeline.tracing.scores``).
One row per set, per-layer (skip or plain) or cross-layer (clt): its kind, activation, width, k,
training tokens and minutes (from its
``set.json``), mean per-layer FVU and dead %, all-layers CE-loss recovered and KL, mean
replacement and completeness scores unpruned and pruned, and mean kept nodes (features, errors,
tokens and logits). Nothing is
written into the run.

    python bench/trace_quality.py --run runs/demo [--sets transcoders,plain] [--max-feature-nodes 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from jobs.run import load_run_model
from jobs.trace import load_transcoders
from pipeline.lm.packing import SpecialTokens, encode_prompt
from pipeline.lm.token_text import load_tokenizer
from pipeline.tracing.pruning import prune
from pipeline.tracing.scores import unpruned_and_pruned
from pipeline.tracing.trace import trace
from storage.home import converted_models_dir
from storage.shards import activations_dir, read_manifest
from storage.transcoder_store import finished_sets, is_cross_layer, read_set, set_dir

PROMPTS = Path(__file__).with_name("trace_prompts.json")


def set_row(record: dict) -> dict:
    """The training side of one set: what it is and how well each layer reconstructs."""
    layers = record["metrics"]["layers"].values()
    every = record["metrics"].get("all_layers") or {}
    training = record["training"]
    first = next(iter(layers), {})
    return {
        "kind": "clt" if is_cross_layer(record) else ("skip" if training.get("skip", True) else "plain"),
        "activation": record["architecture"],
        "width": record["d_sae"],
        "k": record["k"],
        "tokens": training.get("tokens") or training.get("steps", 0) * training.get("batch_size", 0),
        "minutes": training.get("seconds", 0) / 60,
        "fvu": statistics.mean(m["fvu"] for m in layers) if first else float("nan"),
        "dead_pct": 100 * statistics.mean(m["dead_fraction_heldout"] for m in layers) if first else float("nan"),
        "ce_rec": every.get("ce_loss_recovered", float("nan")),
        "kl": every.get("kl_spliced", float("nan")),
    }


def graph_row(model, tcs: dict, tokenizer, prompts: list[dict], max_nodes: int) -> dict:
    """Mean scores and kept nodes over ``prompts``."""
    special = SpecialTokens.from_tokenizer(tokenizer).special_ids
    scores, kept, errors = [], [], []
    for item in prompts:
        ids = torch.tensor(encode_prompt(tokenizer, item["prompt"]))
        graph = trace(model, ids, tcs, None, max_nodes, 32, special_ids=special)
        pruned = prune(graph.adjacency, graph.target_weights(), graph.n_features, graph.n_errors)
        layout = (graph.n_features, graph.n_errors, graph.n_pos)
        scores.append(unpruned_and_pruned(graph.adjacency, graph.target_weights(), pruned.edge_mask_NN, layout))
        kept.append(int(pruned.node_mask_N.sum()))
        errors.append(graph.logit_error)
        print(f"    {item['name']:<20} replacement {scores[-1]['unpruned']['replacement']:.3f} "
              f"completeness {scores[-1]['unpruned']['completeness']:.3f} kept {kept[-1]}", flush=True)  # fmt: skip

    def mean(part: str, score: str) -> float:
        return statistics.mean(s[part][score] for s in scores)

    return {
        "repl": mean("unpruned", "replacement"),
        "compl": mean("unpruned", "completeness"),
        "repl_pruned": mean("pruned", "replacement"),
        "compl_pruned": mean("pruned", "completeness"),
        "kept_nodes": statistics.mean(kept),
        "max_logit_error": max(errors),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--sets", default=None, help="comma-separated set names (default: every finished set)")
    parser.add_argument("--max-feature-nodes", type=int, default=2000)
    parser.add_argument("--prompts", type=Path, default=PROMPTS)
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    args = parser.parse_args()
    run = Path(args.run)
    manifest = read_manifest(activations_dir(run))
    tokenizer = load_tokenizer(manifest.model_spec, converted_models_dir())
    model = load_run_model(manifest, "cpu").model.float()
    prompts = json.loads(args.prompts.read_text())[: args.limit]
    names = args.sets.split(",") if args.sets else finished_sets(run)
    rows = []
    for name in names:
        folder = set_dir(run, name)
        record = read_set(folder)
        tcs = load_transcoders(folder, record)[0]
        print(f"{name}: tracing {len(prompts)} prompts", flush=True)
        started = time.perf_counter()
        graphs = graph_row(model, tcs, tokenizer, prompts, args.max_feature_nodes)
        seconds = (time.perf_counter() - started) / len(prompts)
        rows.append({"set": name, **set_row(record), **graphs, "trace_s": seconds})
    head = ("set", "kind", "activation", "width", "k", "tokens", "minutes", "fvu", "dead_pct", "ce_rec", "kl",
            "repl", "compl", "repl_pruned", "compl_pruned", "kept_nodes", "max_logit_error", "trace_s")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        cells = [f"{row[h]:.3g}" if isinstance(row[h], float) else str(row[h]) for h in head]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
