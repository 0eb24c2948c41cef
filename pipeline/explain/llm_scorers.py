"""LLM scorers after delphi's definitions: detection and fuzzing, one example per prompt.

Detection: given the explanation and a test window, does the feature activate
anywhere in it? Fuzzing: given the explanation and a window with some tokens
marked, are the marked tokens ones it activates on? Activating windows are
marked where the feature is active; non-activating windows get as many marks on
tokens chosen by a fixed hash (so every run marks the same ones).

Each prompt asks for "1" or "0". Where the backend returns log-probabilities of
the first reply token, the prediction is P("1") / (P("1") + P("0")); otherwise
the answer itself (1, 0, or 0.5 when it is neither). Metrics: balanced accuracy
and F1 of prediction >= 0.5, AUROC of the prediction.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.explain.examples import PAD, Windows
from pipeline.explain.llm_explainer import marked_text
from pipeline.explain.metrics import auroc, balanced_accuracy, f1
from pipeline.explain.scorers import Score, window_text

DETECTION = (
    "A neuron of a language model is described as: {explanation}\n"
    "Does the neuron activate anywhere in the text below? Answer with 1 for yes or 0 for no, nothing else."
)
FUZZING = (
    "A neuron of a language model is described as: {explanation}\n"
    "Some tokens of the text below are wrapped in <<double angle brackets>>. Are the wrapped tokens ones on which "
    "this neuron activates? Answer with 1 for yes or 0 for no, nothing else."
)


def probability_of_yes(text: str, logprobs: dict[str, float] | None) -> float:
    """P(yes) from the first token's log-probabilities, or from the answer text."""
    if logprobs:
        yes = sum(math.exp(v) for k, v in logprobs.items() if k.strip() == "1")
        no = sum(math.exp(v) for k, v in logprobs.items() if k.strip() == "0")
        if yes + no > 0:
            return yes / (yes + no)
    answer = text.strip()[:1]
    return 1.0 if answer == "1" else 0.0 if answer == "0" else 0.5


def fuzz_marks(windows: Windows, labels: np.ndarray) -> np.ndarray:
    """Marks [E, W]: the active tokens of activating windows; as many hash-chosen tokens in the others."""
    marks = windows.acts_EW > 0
    n_marks = max(1, int(np.median(marks[labels].sum(axis=1)))) if labels.any() else 1
    for row in np.flatnonzero(~labels):
        valid = np.flatnonzero(windows.tokens_EW[row] != PAD)
        order = np.argsort((valid * 2654435761 + int(windows.keys_E[row])) % 4294967291)
        marks[row, valid[order[:n_marks]]] = True
    return marks


def llm_score(scorer: str, backend, explanation: str, windows: Windows, labels: np.ndarray, vocab) -> Score:
    marks = fuzz_marks(windows, labels) if scorer == "fuzzing" else None
    template = FUZZING if scorer == "fuzzing" else DETECTION
    system = template.format(explanation=explanation)
    predictions = []
    for row in range(len(windows)):
        tokens = windows.tokens_EW[row]
        text = marked_text(tokens, marks[row], vocab) if marks is not None else window_text(tokens, vocab)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        reply = backend.complete(messages, max_tokens=1, temperature=0.0, top_logprobs=5)
        predictions.append(probability_of_yes(reply.text, reply.first_token_logprobs))
    predicted = np.asarray(predictions, dtype=np.float32)
    metrics = {
        "balanced_accuracy": balanced_accuracy(predicted >= 0.5, labels),
        "f1": f1(predicted >= 0.5, labels),
        "auroc": auroc(predicted, labels),
    }
    return Score(scorer, metrics, predicted, labels, windows.keys_E)
