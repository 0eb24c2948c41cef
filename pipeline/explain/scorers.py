"""Scoring an explanation on held-out examples: token-set simulation and sentence-embedding similarity.

Shape legend: E test windows, W tokens per window, H embedding width.

Every scorer returns a ``Score``: its metrics plus the per-example prediction,
label and window key, so a score can be audited example by example. The job
runs each scorer twice, with the feature's own explanation and with a random
other feature's (the control).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pipeline.explain.examples import PAD, Windows
from pipeline.explain.metrics import auroc, pearson
from pipeline.explain.token_explainer import TokenSet

QUOTED = re.compile(r'"([^"]+)"|\'([^\']+)\'|`([^`]+)`')
WORD = re.compile(r"[A-Za-z0-9_]+|[^\sA-Za-z0-9_]")
STOPWORDS = frozenset(
    "a an and are as at be by fires for from in is it of on or that the this to token tokens with when word words"
    " activates activating feature text after before".split()
)


@dataclass(frozen=True)
class Score:
    scorer: str
    metrics: dict[str, float]
    predictions: np.ndarray
    labels: np.ndarray
    keys: np.ndarray


def simulation_score(token_set: TokenSet, test: Windows, labels: np.ndarray, vocab_size: int) -> Score:
    """Predict each token's activation from the token set.

    Metrics: ``auroc`` of the window maximum for activating vs non-activating windows,
    ``correlation`` (Pearson) of predicted and true activations over every token.
    """
    predicted_EW = token_set.predict(test.tokens_EW, vocab_size)
    per_window = predicted_EW.max(axis=1) if len(test) else np.zeros(0, np.float32)
    valid = test.tokens_EW != PAD
    metrics = {
        "auroc": auroc(per_window, labels),
        "correlation": pearson(predicted_EW[valid], test.acts_EW[valid]),
    }
    return Score("simulation", metrics, per_window, labels, test.keys_E)


def embedding_score(explanation_H: np.ndarray, examples_EH: np.ndarray, labels: np.ndarray, keys) -> Score:
    """Cosine of the explanation with each example (unit vectors); ``auroc`` of activating vs not."""
    cosines = examples_EH @ explanation_H if len(examples_EH) else np.zeros(0, np.float32)
    return Score("embedding", {"auroc": auroc(cosines, labels)}, cosines.astype(np.float32), labels, keys)


def token_set_from_text(text: str, vocab: list[str]) -> TokenSet:
    """The tokens a free-text explanation names: its quoted strings, or else its content words.

    A vocabulary token matches when its text, stripped and lower-cased, equals a named string.
    """
    quoted = [next(g for g in match.groups() if g) for match in QUOTED.finditer(text)]
    words = quoted or [w for w in WORD.findall(text) if w.lower() not in STOPWORDS and w.isalnum()]
    wanted = {w.strip().lower() for w in words if w.strip()}
    keys = tuple(i for i, token in enumerate(vocab) if token.strip().lower() in wanted)
    return TokenSet("token", keys, tuple(1.0 for _ in keys))


def window_text(tokens_W: np.ndarray, vocab: list[str]) -> str:
    """The decoded text of one window (PAD dropped)."""
    return "".join(vocab[t] for t in tokens_W.tolist() if 0 <= t < len(vocab))
