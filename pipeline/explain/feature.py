"""Explain one batch of features, embed what search and scoring need, score each label beside its control.

Pure and typed: an ``ExplainContext`` carries what the batch needs (the explainer,
the scorers, the token background, the vocabulary, an LLM backend and the
embedder); nothing here knows the job's options or the storage rows, which
`saescope explain` makes from the ``ScorerResult`` lists returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np

from pipeline.explain.examples import FeatureExamples, Windows
from pipeline.explain.scorers import (
    Score,
    embedding_score,
    simulation_score,
    token_set_from_text,
    window_text,
)
from pipeline.explain.token_explainer import NO_PATTERN, Background, TokenSet, explain_tokens, token_strings

TOP_EXAMPLES_EMBEDDED = 2
"""The feature's strongest training windows whose joined text is embedded for search."""
EMBED_RADIUS = 4
"""Tokens on each side of the centre in an embedded window (MiniLM's cost grows with text length)."""


def _centre_text(tokens_W: np.ndarray, vocab: list[str]) -> str:
    middle = len(tokens_W) // 2
    return window_text(tokens_W[max(0, middle - EMBED_RADIUS) : middle + EMBED_RADIUS + 1], vocab)


@dataclass
class ExplainContext:
    """What explaining and scoring a batch of features needs."""

    explainer: Literal["tokens", "llm"]
    scorers: tuple[str, ...]
    """Scorer names: simulation, embedding, detection, fuzzing."""
    embed_examples: int
    """Activating test windows the embedding scorer embeds per feature (as many negatives)."""
    background: Background
    """Token frequencies of the corpus, for the token explainer."""
    vocab: list[str]
    backend: object | None = None
    """An LLM backend (``complete``) for the LLM explainer and scorers."""
    embedder: object | None = None
    """MiniLM (``encode(texts)``) for the embedding scorer and search vectors."""
    window_vectors: dict = field(default_factory=dict)
    """Vectors of test windows already embedded ("w:<key>"), reused by later batches."""


@dataclass(frozen=True)
class Explained:
    text: str
    token_set: TokenSet
    embedding_text: str
    """What is embedded: an LLM's sentence, or the token explainer's tokens (its label's "fires on" adds nothing)."""


@dataclass(frozen=True)
class FeatureResult:
    feature: int
    examples: FeatureExamples
    explanation: Explained
    control_feature: int | None
    control: Explained | None


def explain_feature(examples: FeatureExamples, ctx: ExplainContext) -> Explained:
    """The explanation of one feature by the configured explainer."""
    if len(examples.train) == 0:
        return Explained(NO_PATTERN, TokenSet("token", (), ()), NO_PATTERN)
    if ctx.explainer == "tokens":
        made = explain_tokens(examples.train, ctx.background, ctx.vocab)
        tokens = token_strings(made.token_set, ctx.vocab, len(ctx.vocab))
        return Explained(made.text, made.token_set, " ".join(t.strip() for t in tokens) or made.text)
    from pipeline.explain.llm_explainer import llm_explanation

    text = llm_explanation(ctx.backend, examples.train, ctx.vocab)
    return Explained(text, token_set_from_text(text, ctx.vocab), text)


def embedding_subset(examples: FeatureExamples, n: int) -> tuple[Windows, np.ndarray]:
    """Up to ``n`` activating test windows and as many non-activating ones (hard first), with labels."""
    positives = examples.positives.take(np.arange(min(n, len(examples.positives))))
    n_hard = min(len(positives) // 2, len(examples.hard_negatives))
    hard = examples.hard_negatives.take(np.arange(n_hard))
    rest = min(len(positives) - n_hard, len(examples.random_negatives))
    windows = Windows.concat(positives, hard, examples.random_negatives.take(np.arange(rest)))
    labels = np.zeros(len(windows), dtype=bool)
    labels[: len(positives)] = True
    return windows, labels


def embed_batch(results: list[FeatureResult], ctx: ExplainContext) -> dict:
    """MiniLM vectors of every explanation, test window and top-example text the batch needs."""
    texts: dict[str, str] = {}
    for result in results:
        for explained in (result.explanation, result.control):
            if explained is not None:
                texts[f"e:{explained.embedding_text}"] = explained.embedding_text
        if "embedding" in ctx.scorers:
            windows, _ = embedding_subset(result.examples, ctx.embed_examples)
            for key, tokens in zip(windows.keys_E.tolist(), windows.tokens_EW, strict=True):
                if f"w:{key}" not in ctx.window_vectors:
                    texts[f"w:{key}"] = _centre_text(tokens, ctx.vocab)
        top = result.examples.train.tokens_EW[:TOP_EXAMPLES_EMBEDDED]
        texts[f"x:{result.feature}"] = " … ".join(_centre_text(tokens, ctx.vocab) for tokens in top)
    names = list(texts)
    vectors = ctx.embedder.encode([texts[n] for n in names]) if names else np.zeros((0, 1), np.float32)
    found = dict(zip(names, vectors, strict=True))
    ctx.window_vectors.update({n: v for n, v in found.items() if n.startswith("w:")})
    return {**found, **ctx.window_vectors}


def _scores(scorer: str, result: FeatureResult, vectors: dict, ctx: ExplainContext) -> tuple[Score, Score | None]:
    """The scorer on the feature's own explanation and on the control explanation."""
    own, control = result.explanation, result.control
    if scorer == "simulation":
        test, labels = result.examples.test()
        run = lambda e: simulation_score(e.token_set, test, labels, len(ctx.vocab))  # noqa: E731
    elif scorer == "embedding":
        test, labels = embedding_subset(result.examples, ctx.embed_examples)
        matrix = np.stack([vectors[f"w:{k}"] for k in test.keys_E.tolist()]) if len(test) else np.zeros((0, 1))
        run = lambda e: embedding_score(vectors[f"e:{e.embedding_text}"], matrix, labels, test.keys_E)  # noqa: E731
    else:
        from pipeline.explain.llm_scorers import llm_score

        test, labels = result.examples.test()
        run = lambda e: llm_score(scorer, ctx.backend, e.text, test, labels, ctx.vocab)  # noqa: E731
    return run(own), (run(control) if control is not None else None)


class ScorerResult(NamedTuple):
    """One scorer's verdict on a feature's explanation and on the control (another feature's explanation)."""

    scorer: str
    score: Score
    control: Score | None


def score_feature(result: FeatureResult, vectors: dict, ctx: ExplainContext) -> list[ScorerResult]:
    """Every configured scorer on the feature's explanation beside the control's (``vectors`` from embed_batch)."""
    return [ScorerResult(scorer, *_scores(scorer, result, vectors, ctx)) for scorer in ctx.scorers]
