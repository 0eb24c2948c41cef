"""`saescope explain`: label every feature and score each label against a control, offline by default.

With ``--transcoders SET`` each layer folder of the set is explained the same way from
its own index (``saescope index --transcoders``), optionally only the latents of saved
graphs (``--graphs``, ``jobs.graph_latents``).

Per feature: train and test examples from the index (pipeline.explain.examples),
an explanation (the token explainer, or an LLM), then each scorer twice — on the
feature's own explanation and on a random other feature's (the control) — on
the same held-out test examples. Explanations are embedded with MiniLM for
search. Features are done in batches; each batch is published atomically to
``explanations.duckdb`` with a "done" row per feature, so a killed job resumes
at the next unfinished batch and a re-run with the same settings does nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from jobs.console import progress
from jobs.explain_report import format_report
from jobs.graph_latents import graph_latents
from jobs.index_transcoders import chosen_layers
from jobs.options import ConfigError, add_config_arguments, config_from_args, option, require
from jobs.run import open_run
from pipeline.explain.embedding import EMBEDDING_MODEL, Embedder
from pipeline.explain.examples import ExampleRows, ExampleSource, FeatureExamples, WindowMaker
from pipeline.explain.feature import ExplainContext, FeatureResult, embed_batch, explain_feature, score_feature
from pipeline.explain.llm_explainer import prompt_hash as llm_prompt_hash
from pipeline.explain.token_explainer import Background, token_strings
from pipeline.runtime.precision import resolve_device
from storage.constants import EXPLAIN_LOCK
from storage.explanations import ExplanationBatch, ExplanationReader, ExplanationStore
from storage.home import converted_models_dir
from storage.index_queries import FeatureIndexError, open_transcoder_index
from storage.locks import exclusive
from storage.sae_store import weights_fingerprint
from storage.shards import activations_dir, read_manifest
from storage.transcoder_store import layer_dir, read_set, resolve_set

SCORERS = ("simulation", "embedding", "detection", "fuzzing")
LLM_SCORERS = ("detection", "fuzzing")
TOKEN_EXPLAINER_VERSION = "tokens-v1"


def parse_feature_range(text: str) -> tuple[int, int] | None:
    """'all' -> None; 'N' -> (N, N); 'A-B' -> (A, B)."""
    text = text.strip()
    if text == "all":
        return None
    try:
        lo, _, hi = text.partition("-")
        bounds = (int(lo), int(hi or lo))
    except ValueError:
        raise ValueError(f"--features {text!r} is not all, an id or a range A-B (e.g. 0-99)") from None
    if bounds[0] < 0 or bounds[1] < bounds[0]:
        raise ValueError(f"--features {text!r}: ids must be >= 0 and A <= B")
    return bounds


@dataclass(frozen=True)
class ExplainConfig:
    """Options of `saescope explain`."""

    run: str = option(help="run directory")
    sae: str | None = option(None, "SAE name (default: the run's only SAE)")
    transcoders: str | None = option(
        None, "explain a transcoder set's latents instead of an SAE's (after `saescope index --transcoders`)"
    )
    layers: str = option("all", "with --transcoders: the layers to explain: all, 5, 0-29 or 1,3,8-10")
    graphs: str | None = option(
        None, "with --transcoders: only the latents of these graphs' nodes: all, or names a,b in runs/R/graphs"
    )
    features: str = option("all", "all, a feature id, or a range A-B")
    explainer: str = option("tokens", "tokens (deterministic, no LLM) or llm")
    llm: str = option("default", "LLM for --explainer llm and LLM scorers: default (SmolLM2), a path, or openai:URL")
    llm_model: str | None = option(None, "model name to request from an openai: endpoint")
    scorers: str = option("simulation,embedding", f"comma-separated: {', '.join(SCORERS)}")
    examples: int = option(40, "examples the explainer reads per feature")
    test_examples: int = option(50, "activating test examples per feature (as many non-activating beside them)")
    embed_examples: int = option(
        5, "activating test examples the embedding scorer embeds per feature (as many negatives)"
    )
    radius: int | None = option(None, "tokens on each side of an example's token (default: 8, or the index's window)")
    batch_features: int = option(256, "features per published batch")
    seed: int = option(0, "seed of the control pairing")
    device: str = option("auto", "device of a local LLM: cpu, cuda, cuda:N or auto")

    def __post_init__(self):
        require(self.explainer in ("tokens", "llm"), f"--explainer {self.explainer!r}: use tokens or llm")
        unknown = [s for s in self.scorer_list() if s not in SCORERS]
        require(not unknown, f"--scorers: unknown scorer {', '.join(unknown)}: use {', '.join(SCORERS)}")
        require(bool(self.scorer_list()), "--scorers is empty: name at least one of " + ", ".join(SCORERS))
        require(self.examples >= 1 and self.test_examples >= 2, "--examples must be >= 1, --test-examples >= 2")
        require(self.embed_examples >= 1, "--embed-examples must be at least 1")
        require(self.radius is None or 1 <= self.radius <= 64, "--radius must be between 1 and 64")
        require(self.batch_features >= 1, "--batch-features must be at least 1")
        require(
            not self.llm.startswith("openai:") or len(self.llm) > len("openai:"),
            "--llm openai: needs the server's base URL, e.g. openai:http://127.0.0.1:8000/v1",
        )
        parse_feature_range(self.features)
        require(self.sae is None or self.transcoders is None, "--sae and --transcoders exclude each other: pick one")
        require(self.layers == "all" or self.transcoders is not None, "--layers needs --transcoders (an SAE has one)")
        require(self.graphs is None or self.transcoders is not None, "--graphs needs --transcoders (graphs are "
                "made of transcoder latents)")  # fmt: skip

    def scorer_list(self) -> list[str]:
        return [s.strip() for s in self.scorers.split(",") if s.strip()]

    def uses_llm(self) -> bool:
        return self.explainer == "llm" or any(s in LLM_SCORERS for s in self.scorer_list())


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Settings:
    """What identifies explanations, test sets and a whole run of this job (hashes of the options)."""

    explainer: str
    model: str
    prompt_hash: str
    test_hash: str
    settings_hash: str

    @classmethod
    def of(cls, cfg: ExplainConfig, fingerprint: str, prompt_hash: str, model: str) -> Settings:
        test = {"test": cfg.test_examples, "embed": cfg.embed_examples, "radius": cfg.radius, "seed": cfg.seed}
        test_hash = _digest({**test, "weights": fingerprint})
        explain = {"explainer": cfg.explainer, "model": model, "prompt": prompt_hash, "examples": cfg.examples}
        everything = {**explain, "test": test_hash, "scorers": sorted(cfg.scorer_list())}
        return cls(cfg.explainer, model, prompt_hash, test_hash, _digest(everything))

    def explanation_id(self, feature: int, cfg: ExplainConfig) -> str:
        return _digest([feature, self.explainer, self.model, self.prompt_hash, cfg.examples, cfg.radius])


@dataclass(frozen=True)
class ExplainSummary:
    n_selected: int
    n_done_before: int
    n_explained: int
    seconds: float
    report: str
    score_rows: tuple = ()
    """The score rows the report summarises (with their explanation text)."""
    settings: Settings | None = None


DEFAULT_RADIUS = 8


def example_radius(cfg: ExplainConfig, index_window: int) -> int:
    """--radius, which the index's window bounds: activations beyond it were not kept."""
    if cfg.radius is None:
        return min(DEFAULT_RADIUS, index_window)
    if cfg.radius > index_window:
        raise ValueError(
            f"--radius {cfg.radius} exceeds the index's window ({index_window} tokens each side): "
            f"use --radius {index_window} or rebuild the index with `saescope index --window {cfg.radius}`"
        )
    return cfg.radius


def _source(index, radius: int) -> tuple[ExampleSource, np.ndarray]:
    inputs = index.explanation_inputs()
    maker = WindowMaker(inputs["context_ids"], inputs["tokens_CT"], radius)
    pool, firing, hard = inputs["pool"], inputs["firing"], inputs["hard"]
    source = ExampleSource(
        ExampleRows(**inputs["rows"]),
        maker,
        pool["context"],
        pool["position"],
        firing["slot"],
        firing["feature"],
        hard["feature"],
        hard["context"],
        hard["position"],
    )
    return source, inputs["tokens_CT"]


def _selected(source: ExampleSource, cfg: ExplainConfig, n_features: int) -> list[int]:
    bounds = parse_feature_range(cfg.features)
    if bounds and bounds[1] >= n_features:
        raise ValueError(f"--features {cfg.features}: this SAE has {n_features} features (0-{n_features - 1})")
    live = source.features()
    return [f for f in live if bounds is None or bounds[0] <= f <= bounds[1]]


def _controls(chunk: list[int], live: list[int], seed: int) -> dict[int, int]:
    """A random other feature for each feature of the chunk (a derangement of the chunk when it has two or more)."""
    rng = np.random.default_rng([seed, chunk[0], len(chunk)])
    if len(chunk) >= 2:
        order = [chunk[i] for i in rng.permutation(len(chunk))]
        return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    others = [f for f in live if f != chunk[0]]
    return {chunk[0]: int(others[rng.integers(len(others))])} if others else {}


class Shared:
    """What every folder explained in one run of the verb shares: the LLM backend and the embedder, made once."""

    def __init__(self, cfg: ExplainConfig):
        self.cfg = cfg
        self.backend = _backend(cfg) if cfg.uses_llm() else None
        self._embedder: Embedder | None = None

    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder()
        return self._embedder


def run_explain(cfg: ExplainConfig) -> ExplainSummary:
    """Explain and score the run's SAE, or with ``--transcoders`` the latents of a transcoder set."""
    if cfg.transcoders is not None:
        return run_explain_transcoders(cfg)
    started = time.perf_counter()
    run = open_run(cfg.run, cfg.sae)
    with run.index() as index:
        return explain_folder(cfg, run.sae_folder, index, run.manifest.special_token_ids, Shared(cfg), started)


def explain_folder(
    cfg: ExplainConfig, sae_folder, index, special_token_ids, shared: Shared, started: float,
    only: set[int] | None = None, label: str = "explain",
) -> ExplainSummary:  # fmt: skip
    """Explain the live features of one SAE folder's ``index`` (those in ``only``, when given); see the module."""
    fingerprint = weights_fingerprint(sae_folder)
    with exclusive(sae_folder / EXPLAIN_LOCK, f"the explanations of {sae_folder}"):
        store = ExplanationStore(sae_folder, fingerprint)
        cfg = replace(cfg, radius=example_radius(cfg, index.window))
        source, tokens_CT = _source(index, cfg.radius)
        selected = [f for f in _selected(source, cfg, index.n_features) if only is None or f in only]
        backend = shared.backend
        prompt_hash = llm_prompt_hash() if cfg.explainer == "llm" else TOKEN_EXPLAINER_VERSION
        model = backend.name if backend and cfg.explainer == "llm" else "-"
        settings = Settings.of(cfg, fingerprint, prompt_hash, model)
        done = store.done_features(settings.settings_hash)
        todo = [f for f in selected if f not in done]
        context = ExplainContext(
            explainer=cfg.explainer,
            scorers=tuple(cfg.scorer_list()),
            embed_examples=cfg.embed_examples,
            background=Background(tokens_CT, len(index.vocab), special_token_ids),
            vocab=index.vocab,
            backend=backend,
            embedder=shared.embedder() if todo else None,
        )
        job = _Job(cfg, settings, source, context)
        live = source.features()
        with progress(len(selected), label, unit="feat", initial=len(selected) - len(todo)) as bar:
            for start in range(0, len(todo), cfg.batch_features):
                chunk = todo[start : start + cfg.batch_features]
                store.append(_explain_chunk(job, chunk, live))
                bar.update(len(chunk))
        rows = _score_rows(store, settings, selected, cfg)
    report = format_report(rows, settings) if store.path.exists() else "no feature had examples to explain"
    seconds = time.perf_counter() - started
    return ExplainSummary(len(selected), len(selected) - len(todo), len(todo), seconds, report, tuple(rows), settings)


def run_explain_transcoders(cfg: ExplainConfig) -> ExplainSummary:
    """Explain a transcoder set layer by layer, each layer folder as an SAE (``explain_folder``); ``--graphs``
    bounds it to the latents of saved graphs. The LLM backend and the embedder load once for every layer."""
    started = time.perf_counter()
    run_dir = Path(cfg.run)
    manifest = read_manifest(activations_dir(run_dir))
    folder = resolve_set(run_dir, cfg.transcoders)
    layers = chosen_layers(cfg.layers, read_set(folder)["layers"], folder.name)
    only = graph_latents(run_dir, cfg.graphs, folder.name) if cfg.graphs is not None else None
    if only is not None:
        layers = [layer for layer in layers if only.get(layer)]
    shared = Shared(cfg)
    totals, rows, settings = [0, 0, 0], [], None
    for layer in layers:
        try:
            index = open_transcoder_index(folder, layer)
        except FeatureIndexError as error:
            raise ConfigError(f"layer {layer} of {folder.name!r} has no current index ({error}): run `saescope "
                              f"index --run {cfg.run} --transcoders {folder.name}` first") from error  # fmt: skip
        with index:
            summary = explain_folder(cfg, layer_dir(folder, layer), index, manifest.special_token_ids, shared,
                                     time.perf_counter(), None if only is None else only[layer],
                                     f"explain layer {layer}")  # fmt: skip
        for i, value in enumerate((summary.n_selected, summary.n_done_before, summary.n_explained)):
            totals[i] += value
        rows += [{**row, "feature": f"L{layer}#{row['feature']}"} for row in summary.score_rows]
        settings = summary.settings or settings
    report = format_report(rows, settings) if rows else "no layer had latents to explain"
    return ExplainSummary(*totals, time.perf_counter() - started, report, tuple(rows), settings)


@dataclass(frozen=True)
class _Job:
    """One run of the verb: its options, identity hashes, example source and the pure explain context."""

    cfg: ExplainConfig
    settings: Settings
    source: ExampleSource
    context: ExplainContext


def _explain_chunk(job: _Job, chunk: list[int], live: list[int]) -> ExplanationBatch:
    cfg, ctx = job.cfg, job.context
    controls = _controls(chunk, live, cfg.seed)
    needed = sorted(set(chunk) | set(controls.values()))
    examples = {f: job.source.for_feature(f, cfg.examples, cfg.test_examples) for f in needed}
    explanations = {f: explain_feature(examples[f], ctx) for f in needed}
    results = [
        FeatureResult(f, examples[f], explanations[f], controls.get(f), explanations.get(controls.get(f)))
        for f in chunk
    ]
    vectors = embed_batch(results, ctx)
    batch = ExplanationBatch()
    for result in results:
        _add_rows(result, vectors, job, batch)
        batch.add("done", feature=result.feature, settings_hash=job.settings.settings_hash)
    return batch


def _add_rows(result: FeatureResult, vectors: dict, job: _Job, batch: ExplanationBatch) -> None:
    """Add the explanation, its scores beside the control, predictions and search vectors to ``batch``."""
    settings, feature, ctx = job.settings, result.feature, job.context
    explanation_id = settings.explanation_id(feature, job.cfg)
    own = result.explanation
    batch.add(
        "explanations",
        explanation_id=explanation_id,
        feature=feature,
        explainer=settings.explainer,
        model=settings.model,
        prompt_hash=settings.prompt_hash,
        text=own.text,
        token_kind=own.token_set.kind,
        tokens=token_strings(own.token_set, ctx.vocab, len(ctx.vocab)),
        token_set=json.dumps(own.token_set.to_json()),
        n_train=len(result.examples.train),
    )
    counts = _counts(result.examples)
    for scorer, score, control in score_feature(result, vectors, ctx):
        for metric, value in score.metrics.items():
            batch.add(
                "scores",
                explanation_id=explanation_id,
                feature=feature,
                scorer=scorer,
                metric=metric,
                value=float(value),
                control_value=float(control.metrics[metric]) if control else None,
                control_feature=result.control_feature,
                test_hash=settings.test_hash,
                n_positive=int(score.labels.sum()),
                n_negative=int((~score.labels).sum()),
                **counts,
            )
        for is_control, scored in ((False, score), (True, control)):
            if scored is not None:
                batch.add(
                    "predictions",
                    explanation_id=explanation_id,
                    scorer=scorer,
                    control=is_control,
                    test_hash=settings.test_hash,
                    keys=scored.keys.astype(np.int64),
                    labels=scored.labels.astype(bool),
                    predictions=np.asarray(scored.predictions, dtype=np.float32),
                )
    batch.add(
        "vectors",
        explanation_id=explanation_id,
        feature=feature,
        explanation_vector=vectors[f"e:{own.embedding_text}"].astype(np.float32),
        examples_vector=vectors[f"x:{feature}"].astype(np.float32),
    )


def _counts(examples: FeatureExamples) -> dict:
    return {"n_random_negative": len(examples.random_negatives), "n_hard_negative": len(examples.hard_negatives)}


def _backend(cfg: ExplainConfig):
    from pipeline.explain.llm_backends import backend_from_spec

    return backend_from_spec(cfg.llm, cfg.llm_model, resolve_device(cfg.device), converted_models_dir())


def _score_rows(store: ExplanationStore, settings: Settings, selected: list[int], cfg: ExplainConfig) -> list[dict]:
    if not store.path.exists():
        return []
    ids = [settings.explanation_id(f, cfg) for f in selected]
    with ExplanationReader(store.path) as reader:
        return reader.score_table(ids, settings.test_hash)


def register(subparsers) -> None:
    parser = subparsers.add_parser("explain", help="label every feature and score the labels against a control")
    add_config_arguments(parser, ExplainConfig)
    parser.set_defaults(handler=command)


def command(args) -> int:
    cfg = config_from_args(ExplainConfig, args)
    summary = run_explain(cfg)
    print(
        f"explained {summary.n_explained} features in {summary.seconds:.0f}s "
        f"({summary.n_done_before} of {summary.n_selected} were already done with these settings; "
        f"embeddings: {EMBEDDING_MODEL})"
    )
    print(summary.report)
    print(f'next: saescope features --run {cfg.run} --query "..."   |   saescope serve --run {cfg.run}')
    return 0
