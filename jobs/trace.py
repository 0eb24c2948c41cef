"""`saescope trace`: the attribution graph of one prompt through a run's transcoders, saved for the /trace page.

Options are checked before the model loads (device, run, transcoder set, thresholds,
graph name, label contexts, the target token, the graph folder), and so is the graph's
memory: ``pipeline.tracing.estimate`` gives its peak from the prompt's length and the
options, printed on every trace, and a graph that would not fit the free memory (RAM's
MemAvailable, or the GPU's free memory) is refused with the settings that would fit.
A saved graph of the same name is refused without ``--force``; with it, the new graph's
files replace the old ones (each written atomically) once it is traced, and only then are
the old graph's supernodes removed: a failed trace or write leaves the old graph whole.
The model runs in float32 (``--float64`` for models whose norm gains make float32 rounding
grow through the skip paths; a completeness error above ``INCOMPLETE`` prints a warning that
says so); the graph is pruned (pipeline.tracing.pruning) and written to
``runs/R/graphs/NAME.json`` in the JSON Neuronpedia's graph viewer uploads, with
saescope's provenance under ``saescope`` and the replacement and completeness scores
(unpruned and pruned) in ``metadata.scores``; the unpruned graph goes beside it in
``runs/R/graphs/NAME.safetensors``.
Feature labels (the viewer's "clerp") say what each feature reads and writes,
``fires on "a", "b" → promotes "c", "d"`` (``pipeline.tracing.feature_labels``): from the
layer's feature index and explanations where `saescope index --transcoders` made them
(``storage.latent_facts``), else from the tokens it fires hardest on over the cache's last
``--label-contexts`` contexts (or the prompt) and its standardised output tokens. Feature
nodes carry ``saescope_density`` and ``saescope_dense`` from the index (null without one).
Suggested supernodes (``pipeline.tracing.supernodes``) go into the graph file's ``qParams`` and
``saescope.suggested_supernodes`` unless ``--no-group``; a person's saved groups (NAME.supernodes.json) are
another file, which a trace never writes.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs.console import human_count, progress
from jobs.options import (
    ConfigError,
    add_config_arguments,
    check_can_create,
    check_device,
    config_from_args,
    option,
    require,
)
from jobs.run import load_run_model
from pipeline.lm.packing import encode_prompt, special_mask
from pipeline.lm.token_text import load_tokenizer
from pipeline.runtime.precision import linear_gflops
from pipeline.sae.cross_layer import CrossLayerTranscoder
from pipeline.sae.cross_layer_format import clt_from_circuit_tracer
from pipeline.sae.transcoder_format import transcoder_from_saelens
from pipeline.tracing.attribution import Graph
from pipeline.tracing.document import TraceSettings, check_every_layer, set_source, target_token, trace_document
from pipeline.tracing.estimate import Estimate, GiB, GraphShape, estimate, largest_fitting
from pipeline.tracing.feature_labels import facts_from_index
from pipeline.tracing.graph_json import graph_nodes, to_json
from pipeline.tracing.graph_tensors import graph_tensors
from pipeline.tracing.paths import strongest_paths
from pipeline.tracing.pruning import Pruned
from storage.graph_groups import (
    check_graph_name,
    graph_files,
    graph_name_for,
    graphs_dir,
    supernodes_path,
    write_graph_json,
    write_graph_tensors,
)
from storage.home import converted_models_dir
from storage.latent_facts import indexed_latents
from storage.sae_store import SaeStoreError
from storage.shards import activations_dir, read_manifest
from storage.training_data import last_context_tokens
from storage.transcoder_store import is_cross_layer, load_clt_files, load_layer_files, read_set, resolve_set


@dataclass(frozen=True)
class TraceConfig:
    """Options of `saescope trace`."""

    run: str = option(help="run directory holding a transcoder set (saescope train --transcoder)")
    prompt: str = option(help="the text to trace (BOS is prepended, as in every cached context)")
    target: str | None = option(
        None, "trace this next token's logit only (one token, e.g. ' Paris' with its space); default: the top logits"
    )
    transcoders: str | None = option(None, "transcoder set of the run (default: its only one)")
    name: str | None = option(None, "graph name in runs/R/graphs (default: from the prompt)")
    max_feature_nodes: int = option(2000, "at most this many feature nodes, the most influential on the targets")
    node_threshold: float = option(0.8, "keep the nodes holding this share of the influence on the targets")
    edge_threshold: float = option(0.98, "keep the edges holding this share of the influence among kept nodes")
    batch_size: int = option(32, "target rows per backward pass")
    chat: bool = option(False, "wrap the prompt in the tokenizer's chat template as one user turn")
    paths: int = option(3, "strongest paths to print per target logit")
    label_contexts: int = option(
        16, "cached contexts searched for the tokens each feature fires on, for its label (0: output tokens only)"
    )
    group: bool = option(True, "suggest supernodes in the graph file (qParams.supernodes); --no-group leaves them out")
    qk_targets: int = option(
        2, "targets whose heads get QK tracing (why they attend): strongest feature, top logit, more features; 0: off"
    )
    json: bool = option(False, "print the graph document as JSON on stdout (it is saved either way)")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    float64: bool = option(
        False, "trace in float64 (twice the memory, slower): where float32 rounding grows through skip paths "
        "(Gemma's large norm gains), the completeness error printed says so"
    )
    force: bool = option(False, "replace a saved graph of the same name (its supernodes go with it)")

    def __post_init__(self):
        require(bool(self.prompt.strip()), "--prompt is empty: give the text to trace")
        require(self.max_feature_nodes >= 1, f"--max-feature-nodes must be at least 1, got {self.max_feature_nodes}")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.paths >= 0, f"--paths must be >= 0, got {self.paths}")
        require(self.label_contexts >= 0, f"--label-contexts must be >= 0, got {self.label_contexts}")
        require(self.qk_targets >= 0, f"--qk-targets must be >= 0, got {self.qk_targets}")
        for flag, value in (("--node-threshold", self.node_threshold), ("--edge-threshold", self.edge_threshold)):
            require(0 < value <= 1, f"{flag} must be in (0, 1], got {value}")
        if self.name is not None:
            try:
                check_graph_name(self.name)
            except ValueError as error:
                raise ConfigError(str(error)) from error


def target_id(tokenizer, text: str | None) -> int | None:
    """The one token ``--target`` names (ConfigError otherwise, suggesting the spaced form)."""
    if text is None:
        return None
    try:
        return target_token(tokenizer, text)
    except ValueError as error:
        raise ConfigError(f"--target {error}") from error


def label_contexts(run_dir: Path, manifest, n_contexts: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cache's last ``n_contexts`` contexts and their ordinary positions, for feature labels (None for 0)."""
    if n_contexts == 0:
        return None
    tokens_CT = last_context_tokens(activations_dir(run_dir), manifest, n_contexts)
    return tokens_CT, ~special_mask(tokens_CT, manifest.special_token_ids)


@dataclass(frozen=True)
class Plan:
    """A trace with every option checked, before the model loads."""

    run_dir: Path
    manifest: object
    folder: Path
    tokenizer: object
    target: int | None
    ids: list[int]
    transcoders: dict
    name: str
    shape: GraphShape
    clt: CrossLayerTranscoder | None = None
    """The set's cross-layer transcoder (``transcoders`` then holds its layer views), else None."""

    def on_device(self, device: str, dtype: torch.dtype = torch.float32) -> dict:
        """Layer -> transcoder (or CLT layer view) on ``device``, in ``dtype`` when that is float64."""
        wide = dtype == torch.float64
        if self.clt is not None:
            clt = self.clt.to(device).to(torch.float64) if wide else self.clt.to(device)
            return {layer: clt.layer_view(layer) for layer in range(clt.cfg.n_layers)}
        return {
            layer: tc.to(device).to(torch.float64) if wide else tc.to(device) for layer, tc in self.transcoders.items()
        }


def check_name_free(run_dir: Path, name: str, force: bool) -> None:
    """A saved graph of this name (any of its files) is refused unless ``force`` replaces it."""
    existing = graph_files(run_dir, name)
    if existing and not force:
        files = ", ".join(path.name for path in existing)
        raise ConfigError(
            f"--name: graph {name!r} is already saved in {graphs_dir(run_dir)} ({files}): choose another --name, "
            "or pass --force to replace it and its supernodes"
        )


def check_label_contexts(requested: int, n_contexts: int) -> None:
    if requested > n_contexts:
        raise ConfigError(
            f"--label-contexts {requested} is more than the {n_contexts} contexts the run's cache holds: "
            f"use at most {n_contexts} (0 labels by output tokens only)"
        )


def active_per_token(tc, cfg: dict) -> float:
    """k for a TopK transcoder; else twice its recorded L0 (at most d_sae), or d_sae when none is recorded."""
    if tc.cfg.architecture == "topk":
        return float(tc.cfg.k)
    l0 = cfg.get("saescope", {}).get("metrics", {}).get("l0")
    if isinstance(l0, int | float) and l0 > 0:
        return min(2.0 * l0, float(tc.cfg.d_sae))
    return float(tc.cfg.d_sae)


def graph_shape(cfg: TraceConfig, manifest, n_tokens: int, layer_cfgs: dict, tcs: dict, target) -> GraphShape:
    """The estimate's inputs: the prompt, the model's record in the cache, the transcoders (and each layer's cfg.json),
    the options (a CLT's layers write (L+1)/2 output layers on average)."""
    model = manifest.provenance["model"]
    per_token = [active_per_token(tcs[layer], layer_cfgs[layer]) for layer in tcs]
    return GraphShape(
        n_tokens=n_tokens,
        n_layers=len(tcs),
        d_model=int(model["d_model"]),
        vocab=int(model.get("vocab_size") or 1),
        d_sae=max(tc.cfg.d_sae for tc in tcs.values()),
        active_per_token=sum(per_token) / len(per_token),
        batch_size=cfg.batch_size,
        max_feature_nodes=cfg.max_feature_nodes,
        n_logits=1 if target is not None else 10,
        label_tokens=cfg.label_contexts * manifest.ctx_len,
        decoder_outputs=_mean_outputs(tcs),
        bytes_per_number=8 if cfg.float64 else 4,
    )


def _mean_outputs(tcs: dict) -> float:
    """Output layers a feature writes, on average over the layers (CLT layer views: l..L-1; else 1)."""
    return sum(len(getattr(tc, "output_layers", range(1))) for tc in tcs.values()) / len(tcs)


def _load(cfg: TraceConfig) -> Plan:
    check_device("--device", cfg.device)
    run_dir = Path(cfg.run)
    manifest = read_manifest(activations_dir(run_dir))
    folder = resolve_set(run_dir, cfg.transcoders)
    layers = read_set(folder)["layers"]
    try:
        check_every_layer(folder.name, layers, int(manifest.provenance["model"]["n_layers"]), str(run_dir))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    name = cfg.name or graph_name_for(cfg.prompt)
    check_name_free(run_dir, name, cfg.force)
    check_can_create("--run", graphs_dir(run_dir))
    check_label_contexts(cfg.label_contexts, manifest.n_contexts)
    tokenizer = load_tokenizer(manifest.model_spec, converted_models_dir())
    target = target_id(tokenizer, cfg.target)
    ids = encode_prompt(tokenizer, cfg.prompt, chat=cfg.chat)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit and limit < 10**9 and len(ids) > limit:
        raise ConfigError(f"--prompt is {len(ids)} tokens, beyond the model's {limit} positions")
    tcs, layer_cfgs, clt = load_transcoders(folder, read_set(folder))
    shape = graph_shape(cfg, manifest, len(ids), layer_cfgs, tcs, target)
    return Plan(run_dir, manifest, folder, tokenizer, target, ids, tcs, name, shape, clt)


def load_transcoders(folder: Path, record: dict) -> tuple[dict, dict, CrossLayerTranscoder | None]:
    """(layer -> transcoder or CLT layer view, layer -> cfg.json, the CLT or None) of a finished set."""
    if is_cross_layer(record):
        try:
            clt = clt_from_circuit_tracer(*load_clt_files(folder))
        except ValueError as error:
            raise SaeStoreError(f"{folder}: {error}") from error
        cfgs = {layer: {"saescope": {"metrics": record.get("metrics") or {}}} for layer in range(clt.cfg.n_layers)}
        return {layer: clt.layer_view(layer) for layer in range(clt.cfg.n_layers)}, cfgs, clt
    files = {layer: load_layer_files(folder, layer) for layer in record["layers"]}
    tcs = {layer: transcoder_from_saelens(*layer_files) for layer, layer_files in files.items()}
    return tcs, {layer: layer_files[1] for layer, layer_files in files.items()}, None


def free_memory(device: str) -> int | None:
    """Bytes a trace may use: the GPU's free memory on CUDA, else MemAvailable in /proc/meminfo (None: unknown)."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.1f} GiB" if n_bytes >= GiB else f"{n_bytes / 2**20:.0f} MiB"


def _fixes(shape: GraphShape, free: int, ctx_len: int) -> list[str]:
    """The one-option changes whose graph would fit ``free`` bytes."""
    fixes = []
    tokens = largest_fitting(shape, "n_tokens", free)
    if tokens is not None:
        fixes.append(f"a prompt of at most {tokens} tokens")
    for flag, field_name in (("--max-feature-nodes", "max_feature_nodes"), ("--batch-size", "batch_size")):
        fitting = largest_fitting(shape, field_name, free)
        if fitting is not None:
            fixes.append(f"{flag} {fitting}")
    label_tokens = largest_fitting(shape, "label_tokens", free, lowest=0) if shape.label_tokens else None
    if label_tokens is not None:
        fixes.append(f"--label-contexts {label_tokens // ctx_len}")
    return fixes


def check_fits(plan: Plan, est: Estimate, free: int | None) -> None:
    """Refuse a graph whose estimated peak exceeds the free memory, naming what would fit."""
    if free is None or est.peak_bytes <= free:
        return
    fixes = _fixes(plan.shape, free, plan.manifest.ctx_len)
    advice = "use " + " or ".join(fixes) if fixes else "no smaller setting fits: use a machine with more memory"
    raise ConfigError(
        f"--prompt: tracing {plan.shape.n_tokens} tokens would need about {_gib(est.peak_bytes)} at its peak "
        f"({est.n_active:,} active features, {est.n_feature_nodes:,} feature nodes, {est.n_nodes:,} graph nodes) "
        f"but {_gib(free)} is free: {advice}"
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def estimate_line(plan: Plan, est: Estimate, free: int | None, seconds: float) -> str:
    """What `saescope trace` prints before it starts: the graph's size, peak memory and time."""
    room = f" of {_gib(free)} free" if free is not None else ""
    return (
        f"estimate: {plan.shape.n_tokens} tokens, ~{est.n_active:,} active features, {est.n_feature_nodes:,} "
        f"feature nodes, {est.n_backward_passes:,} backward passes; peak ~{_gib(est.peak_bytes)}{room}; "
        f"~{_duration(seconds)} (see pipeline/tracing/estimate.py)"
    )


class StageBars:
    """``on_progress(stage, done, total)`` as one progress bar per stage on stderr."""

    UNITS = {"backward passes": "pass", "label contexts": "ctx"}

    def __init__(self):
        self.bars: dict = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = progress(total, stage, unit=self.UNITS.get(stage, "it"))
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def run_trace(cfg: TraceConfig, say=lambda line: print(line, file=sys.stderr)) -> dict:
    """Check, estimate, trace, prune, label and save; returns the graph document plus a ``summary`` for printing."""
    started = time.perf_counter()
    plan = _load(cfg)
    est, free = estimate(plan.shape), free_memory(cfg.device)
    check_fits(plan, est, free)
    dtype = torch.float64 if cfg.float64 else torch.float32
    seconds = est.seconds(linear_gflops(dtype, torch.device(cfg.device)) * 1e9, plan.shape.n_layers)
    say(estimate_line(plan, est, free, seconds))
    run_dir, manifest, tokenizer = plan.run_dir, plan.manifest, plan.tokenizer
    loaded = load_run_model(manifest, cfg.device)
    model = loaded.model.to(dtype)
    tcs = plan.on_device(cfg.device, dtype)
    model_record = manifest.provenance["model"]
    source = set_source(plan.name, cfg.prompt, plan.ids, run_dir.resolve().name, plan.folder.name, sorted(tcs),
                        model_record)  # fmt: skip
    settings = TraceSettings(cfg.max_feature_nodes, cfg.node_threshold, cfg.edge_threshold, cfg.batch_size,
                             group=cfg.group, qk_targets=cfg.qk_targets)  # fmt: skip
    contexts = label_contexts(run_dir, manifest, cfg.label_contexts)
    bars = StageBars()
    describe = lambda wanted: facts_from_index(indexed_latents(plan.folder, wanted))  # noqa: E731
    try:
        traced = trace_document(model, tcs, plan.ids, tokenizer, plan.target, settings, source, contexts, bars,
                                describe=describe)  # fmt: skip
    finally:
        bars.close()
    graph, pruned, document = traced.graph, traced.pruned, traced.document
    document["saescope"]["timings"]["wall_s"] = time.perf_counter() - started
    document["saescope"]["estimate"] = {"peak_bytes": est.peak_bytes, "seconds": round(seconds, 1),
                                        "n_active": est.n_active}  # fmt: skip
    write_graph_tensors(run_dir, plan.name, *graph_tensors(graph))  # each write replaces the old file atomically
    path = write_graph_json(run_dir, plan.name, to_json(document))
    if cfg.force:
        supernodes_path(run_dir, plan.name).unlink(missing_ok=True)  # grouped the old graph's nodes
    summary = summarize(graph, pruned, document, tokenizer, cfg.paths)
    return {"document": document, "path": path, "name": plan.name, "summary": summary}


def _node_text(node: dict) -> str:
    kind = node["feature_type"]
    if kind == "embedding":
        return f'token "{node.get("token_text", "")}"@{node["ctx_idx"]}'
    if kind == "logit":
        return node["clerp"]
    if kind == "mlp reconstruction error":
        return f"L{node['layer']} error@{node['ctx_idx']}"
    latent = node["node_id"].split("_")[1]
    return f"L{node['layer']} #{latent}@{node['ctx_idx']} ({node['clerp']})"


def summarize(graph: Graph, pruned: Pruned, document: dict, tokenizer, n_paths: int) -> dict:
    """Counts, completeness, the error share and the strongest paths of the saved graph."""
    by_index = _all_nodes(graph, document, tokenizer)
    inputs = torch.zeros(graph.adjacency.shape[0], dtype=torch.bool)
    first_token = graph.n_features + graph.n_errors
    inputs[first_token : first_token + graph.n_pos] = True
    kept = pruned.node_mask_N
    n_logit = graph.adjacency.shape[0] - graph.n_logits
    top_row = graph.adjacency[n_logit].abs()
    errors = slice(graph.n_features, first_token)
    paths = []
    features = torch.zeros_like(inputs)
    features[: graph.n_features] = True
    direct = []
    for k in range(graph.n_logits):
        found = strongest_paths(graph.adjacency, pruned.edge_mask_NN, inputs, n_logit + k, n_paths, features)
        paths.append([(strength, [by_index[i] for i in path]) for path, strength in found])
        (edge, share), *_ = strongest_paths(graph.adjacency, pruned.edge_mask_NN, inputs, n_logit + k, 1) or [([], 0)]
        direct.append((share, [by_index[i] for i in edge]))
    return {
        "n_tokens": graph.n_pos,
        "n_active_features": graph.n_active_features,
        "n_feature_nodes": graph.n_features,
        "kept_features": int(kept[: graph.n_features].sum()),
        "kept_errors": int(kept[errors].sum()),
        "kept_edges": int(pruned.edge_mask_NN.sum()),
        "logit_error": graph.logit_error,
        "scores": document["metadata"]["scores"],
        "error_share_top_logit": float(top_row[errors].sum() / top_row.sum().clamp_min(1e-30)),
        "targets": [
            (tokenizer.decode([t]), p)
            for t, p in zip(graph.logit_tokens.tolist(), graph.logit_probs.tolist(), strict=True)
        ],
        "paths": paths,
        "direct": direct,
        "timings": document["saescope"]["timings"],
        "backward_passes": graph.n_backward_passes,
        "qk": qk_lines(document),
    }


def qk_lines(document: dict) -> list[str]:
    """One line per QK-traced target: its strongest head, the attention edge, the top pair and its share."""
    tokens, lines, seen = document["metadata"]["prompt_tokens"], [], set()
    for entry in document["saescope"].get("qk_tracing", []):
        if entry["target"] in seen:
            continue
        seen.add(entry["target"])
        q_id, k_id, value = entry["qk_tracing_results"]["pair_wise_contributors"][0]
        share = value / entry["score"] if entry["score"] else float("nan")
        q, k = entry["query_pos"], entry["key_pos"]
        lines.append(
            f"  QK into {entry['target']}: L{entry['layer']}.H{entry['head']} attends {tokens[q]!r}@{q} -> "
            f"{tokens[k]!r}@{k} (p={entry['pattern']:.2f}, score {entry['score']:.2f}); "
            f"top pair {q_id} x {k_id}: {value:.2f} ({share:.0%} of the score)"
        )
    return lines


def _all_nodes(graph: Graph, document: dict, tokenizer) -> dict[int, str]:
    """Adjacency index -> printable node text."""
    nodes = graph_nodes(graph, [0.0] * graph.adjacency.shape[0], lambda t: tokenizer.decode([t]),
                        {(int(n["layer"]), int(n["node_id"].split("_")[1])): n["clerp"] for n in document["nodes"]
                         if n["feature_type"] == "cross layer transcoder"})  # fmt: skip
    for node, token in zip(nodes[graph.n_features + graph.n_errors :], graph.prompt_ids.tolist(), strict=False):
        node["token_text"] = tokenizer.decode([token])
    return {i: _node_text(node) for i, node in enumerate(nodes)}


INCOMPLETE = 1e-3
"""A completeness error above this (in logits) is not float32 rounding of a healthy trace: it gets a warning."""


def incomplete_warning(logit_error: float) -> list[str]:
    """One warning line when the replacement model misses the model's logits by more than ``INCOMPLETE``."""
    if logit_error <= INCOMPLETE:
        return []
    return [
        f"  warning: completeness error {logit_error:.2g} > {INCOMPLETE:g}: float32 rounding grew through the "
        "transcoders' skip paths (large norm gains, as in Gemma); the edges are approximate. "
        "Trace again with --float64, or use plain transcoders (train --transcoder --no-skip)"
    ]


def format_trace(result: dict) -> str:
    s = result["summary"]
    t = s["timings"]
    lines = [
        f"traced {s['n_tokens']} tokens in {t.get('wall_s', 0):.0f}s ({s['backward_passes']} backward passes)",
        "  targets: " + ", ".join(f"{text!r} p={p:.3f}" for text, p in s["targets"]),
        f"  completeness: the replacement model's last logits are within {s['logit_error']:.2g} of the model's",
        *incomplete_warning(s["logit_error"]),
        "  scores (unpruned / pruned): replacement {:.3f} / {:.3f}, completeness {:.3f} / {:.3f}".format(
            *(s["scores"][g][k] for k in ("replacement", "completeness") for g in ("unpruned", "pruned"))
        ),
        f"  features: {human_count(s['n_active_features'])} active, {s['n_feature_nodes']} attributed, "
        f"{s['kept_features']} kept; {s['kept_errors']} error nodes and {s['kept_edges']} edges kept",
        f"  error nodes carry {100 * s['error_share_top_logit']:.0f}% of the top logit's direct input",
    ]
    for (text, _), paths, (share, edge) in zip(s["targets"], s["paths"], s["direct"], strict=True):
        if paths or edge:
            lines.append(f"  strongest paths to {text!r} through features (strongest direct: {share:.3f} from "
                         f"{edge[0] if edge else '-'}):")  # fmt: skip
            lines.extend(f"    {strength:.3f}  " + " -> ".join(nodes) for strength, nodes in paths)
    lines.extend(s.get("qk", []))
    lines.append(f"  saved {result['path']}")
    lines.append(
        f"next: saescope serve --run {Path(result['path']).parent.parent}  (page /trace?graph={result['name']})"
    )
    return "\n".join(lines)


def register(subparsers) -> None:
    parser = subparsers.add_parser("trace", help="attribution graph of a prompt through the run's transcoders")
    add_config_arguments(parser, TraceConfig)
    parser.set_defaults(handler=lambda args: command(config_from_args(TraceConfig, args)))


def command(cfg: TraceConfig) -> int:
    result = run_trace(cfg)
    print(json.dumps(result["document"], ensure_ascii=False) if cfg.json else format_trace(result))
    return 0
