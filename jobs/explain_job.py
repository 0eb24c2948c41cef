"""`saescope explain`: label every feature and score each label against a control, offline by default.

Per feature: train and test examples from the index (pipeline/explain_examples),
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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from jobs.common import progress
from jobs.config import add_config_arguments, config_from_args, option, require
from jobs.explain_report import format_report
from jobs.explain_scoring import FeatureResult, embed_chunk, explain_feature, score_feature
from pipeline.embedding import EMBEDDING_MODEL, Embedder
from pipeline.explain_examples import ExampleRows, ExampleSource, WindowMaker
from pipeline.llm_explainer import prompt_hash as llm_prompt_hash
from pipeline.token_explainer import Background
from storage.constants import EXPLAIN_LOCK
from storage.explanations import ExplanationBatch, ExplanationReader, ExplanationStore
from storage.feature_queries import open_sae_index
from storage.locks import exclusive
from storage.sae_store import resolve_sae, weights_fingerprint
from storage.shards import activations_dir, read_manifest

SCORERS = ("simulation", "embedding", "detection", "fuzzing")
LLM_SCORERS = ("detection", "fuzzing")
TOKEN_EXPLAINER_VERSION = "tokens-v1"


def parse_features(text: str) -> tuple[int, int] | None:
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
        parse_features(self.features)

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
    bounds = parse_features(cfg.features)
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


def run_explain(cfg: ExplainConfig) -> ExplainSummary:
    started = time.perf_counter()
    run_dir = Path(cfg.run)
    manifest = read_manifest(activations_dir(run_dir))
    sae_folder = resolve_sae(run_dir, cfg.sae)
    fingerprint = weights_fingerprint(sae_folder)
    with open_sae_index(sae_folder) as index, exclusive(sae_folder / EXPLAIN_LOCK, f"the explanations of {sae_folder}"):
        store = ExplanationStore(sae_folder, fingerprint)
        cfg = replace(cfg, radius=example_radius(cfg, index.window))
        source, tokens_CT = _source(index, cfg.radius)
        selected = _selected(source, cfg, index.n_features)
        backend = _backend(cfg) if cfg.uses_llm() else None
        prompt_hash = llm_prompt_hash() if cfg.explainer == "llm" else TOKEN_EXPLAINER_VERSION
        model = backend.name if backend and cfg.explainer == "llm" else "-"
        settings = Settings.of(cfg, fingerprint, prompt_hash, model)
        done = store.done_features(settings.settings_hash)
        todo = [f for f in selected if f not in done]
        context = _Context(
            cfg,
            settings,
            source,
            Background(tokens_CT, len(index.vocab), manifest.special_token_ids),
            index.vocab,
            backend,
            Embedder() if todo else None,
        )
        live = source.features()
        with progress(len(selected), "explain", unit="feat", initial=len(selected) - len(todo)) as bar:
            for start in range(0, len(todo), cfg.batch_features):
                chunk = todo[start : start + cfg.batch_features]
                store.append(_explain_chunk(context, chunk, live))
                bar.update(len(chunk))
        report = _report(store, settings, selected, cfg)
    return ExplainSummary(len(selected), len(selected) - len(todo), len(todo), time.perf_counter() - started, report)


@dataclass
class _Context:
    cfg: ExplainConfig
    settings: Settings
    source: ExampleSource
    background: Background
    vocab: list[str]
    backend: object
    embedder: Embedder | None
    window_vectors: dict = field(default_factory=dict)
    """MiniLM vectors of test windows already embedded ("w:<key>"), shared by later batches."""


def _explain_chunk(ctx: _Context, chunk: list[int], live: list[int]) -> ExplanationBatch:
    controls = _controls(chunk, live, ctx.cfg.seed)
    needed = sorted(set(chunk) | set(controls.values()))
    examples = {f: ctx.source.for_feature(f, ctx.cfg.examples, ctx.cfg.test_examples) for f in needed}
    explanations = {f: explain_feature(examples[f], ctx) for f in needed}
    results = [
        FeatureResult(f, examples[f], explanations[f], controls.get(f), explanations.get(controls.get(f)))
        for f in chunk
    ]
    vectors = embed_chunk(results, ctx)
    batch = ExplanationBatch()
    for result in results:
        score_feature(result, vectors, ctx, batch)
        batch.add("done", feature=result.feature, settings_hash=ctx.settings.settings_hash)
    return batch


def _backend(cfg: ExplainConfig):
    from jobs.llm_setup import make_backend

    return make_backend(cfg.llm, cfg.llm_model, cfg.device)


def _report(store: ExplanationStore, settings: Settings, selected: list[int], cfg: ExplainConfig) -> str:
    if not store.path.exists():
        return "no feature had examples to explain"
    ids = [settings.explanation_id(f, cfg) for f in selected]
    with ExplanationReader(store.path) as reader:
        return format_report(reader.score_table(ids, settings.test_hash), settings)


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
