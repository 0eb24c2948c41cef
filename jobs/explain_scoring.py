"""Glue of `saescope explain` for one batch of features: explain, embed, score beside the control, record rows."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from pipeline.explain_examples import FeatureExamples, Windows
from pipeline.explanation_scorers import (
    Score,
    embedding_score,
    simulation_score,
    token_set_from_text,
    window_text,
)
from pipeline.token_explainer import NO_PATTERN, TokenSet, explain_tokens, token_strings
from storage.explanations import ExplanationBatch

TOP_EXAMPLES_EMBEDDED = 2
"""The feature's strongest training windows whose joined text is embedded for search."""
EMBED_RADIUS = 4
"""Tokens on each side of the centre in an embedded window (MiniLM's cost grows with text length)."""


def _centre_text(tokens_W: np.ndarray, vocab: list[str]) -> str:
    middle = len(tokens_W) // 2
    return window_text(tokens_W[max(0, middle - EMBED_RADIUS) : middle + EMBED_RADIUS + 1], vocab)


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


def explain_feature(examples: FeatureExamples, ctx) -> Explained:
    """The explanation of one feature by the configured explainer."""
    if len(examples.train) == 0:
        return Explained(NO_PATTERN, TokenSet("token", (), ()), NO_PATTERN)
    if ctx.cfg.explainer == "tokens":
        made = explain_tokens(examples.train, ctx.background, ctx.vocab)
        tokens = token_strings(made.token_set, ctx.vocab, len(ctx.vocab))
        return Explained(made.text, made.token_set, " ".join(t.strip() for t in tokens) or made.text)
    from pipeline.llm_explainer import llm_explanation

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


def embed_chunk(results: list[FeatureResult], ctx) -> dict:
    """MiniLM vectors of every explanation, test window and top-example text the batch needs."""
    texts: dict[str, str] = {}
    for result in results:
        for explained in (result.explanation, result.control):
            if explained is not None:
                texts[f"e:{explained.embedding_text}"] = explained.embedding_text
        if "embedding" in ctx.cfg.scorer_list():
            windows, _ = embedding_subset(result.examples, ctx.cfg.embed_examples)
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


def _scores(scorer: str, result: FeatureResult, vectors: dict, ctx) -> tuple[Score, Score | None]:
    """The scorer on the feature's own explanation and on the control explanation."""
    own, control = result.explanation, result.control
    if scorer == "simulation":
        test, labels = result.examples.test()
        run = lambda e: simulation_score(e.token_set, test, labels, len(ctx.vocab))  # noqa: E731
    elif scorer == "embedding":
        test, labels = embedding_subset(result.examples, ctx.cfg.embed_examples)
        matrix = np.stack([vectors[f"w:{k}"] for k in test.keys_E.tolist()]) if len(test) else np.zeros((0, 1))
        run = lambda e: embedding_score(vectors[f"e:{e.embedding_text}"], matrix, labels, test.keys_E)  # noqa: E731
    else:
        from pipeline.llm_scorers import llm_score

        test, labels = result.examples.test()
        run = lambda e: llm_score(scorer, ctx.backend, e.text, test, labels, ctx.vocab)  # noqa: E731
    return run(own), (run(control) if control is not None else None)


def score_feature(result: FeatureResult, vectors: dict, ctx, batch: ExplanationBatch) -> None:
    """Add the explanation, its scores beside the control, predictions and search vectors to ``batch``."""
    settings, feature = ctx.settings, result.feature
    explanation_id = settings.explanation_id(feature, ctx.cfg)
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
    for scorer in ctx.cfg.scorer_list():
        score, control = _scores(scorer, result, vectors, ctx)
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
