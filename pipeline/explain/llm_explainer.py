"""The LLM explainer: a delphi-style prompt of marked examples with 0-10 activations, and its parsing.

The prompt shows each training window with the tokens where the feature is
active wrapped in <<...>>, then lists those tokens with their activation scaled
to 0-10 (10 = the strongest activation among the shown examples). The model is
asked for one short phrase on a final "[EXPLANATION]:" line.
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.explain.examples import PAD, Windows

SHOWN_EXAMPLES = 12
MAX_TOKENS = 48
TEMPERATURE = 0.0
SYSTEM = (
    "You study one neuron of a language model. You see text excerpts in which it activates; the tokens where it "
    "activates are wrapped in <<double angle brackets>>. After each excerpt the activating tokens are listed with "
    "their activation on a scale from 0 to 10. Find what the excerpts have in common and describe, in one short "
    "phrase of at most 15 words, what makes the neuron activate. End with one line: [EXPLANATION]: <phrase>"
)
FALLBACK = "unclear pattern"


def prompt_hash() -> str:
    """Identifies the prompt and decoding settings (part of an explanation's identity)."""
    return hashlib.sha256(f"{SYSTEM}|{SHOWN_EXAMPLES}|{MAX_TOKENS}|{TEMPERATURE}".encode()).hexdigest()[:16]


def _token(token_id: int, vocab: list[str]) -> str:
    return vocab[token_id] if 0 <= token_id < len(vocab) else ""


def marked_text(tokens_W: np.ndarray, marked_W: np.ndarray, vocab: list[str]) -> str:
    """The window's text with each run of marked tokens wrapped in <<...>>."""
    parts, inside = [], False
    for token, mark in zip(tokens_W.tolist(), marked_W.tolist(), strict=True):
        if token == PAD:
            continue
        if mark and not inside:
            parts.append("<<")
        if not mark and inside:
            parts.append(">>")
        inside = bool(mark)
        parts.append(_token(token, vocab))
    return "".join(parts) + (">>" if inside else "")


def explanation_messages(train: Windows, vocab: list[str]) -> list[dict]:
    shown = train.take(np.arange(min(SHOWN_EXAMPLES, len(train))))
    scale = float(shown.acts_EW.max()) or 1.0
    lines = []
    for i, (tokens, acts) in enumerate(zip(shown.tokens_EW, shown.acts_EW, strict=True), start=1):
        active = acts > 0
        listed = ", ".join(
            f"{_token(t, vocab).strip() or repr(_token(t, vocab))} ({round(10 * a / scale)})"
            for t, a in zip(tokens[active].tolist(), acts[active].tolist(), strict=True)
        )
        lines.append(f"Example {i}: {marked_text(tokens, active, vocab)}\nActivations: {listed}")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n\n".join(lines)}]


def parse_explanation(reply: str) -> str:
    """The phrase after the last "[EXPLANATION]:", else the reply's first non-empty line; never empty."""
    marker = "[EXPLANATION]:"
    text = reply.rsplit(marker, 1)[1] if marker in reply else reply
    lines = [line.strip().strip('"').strip() for line in text.splitlines()]
    phrase = next((line for line in lines if line), "")
    return phrase[:160] or FALLBACK


def llm_explanation(backend, train: Windows, vocab: list[str]) -> str:
    reply = backend.complete(explanation_messages(train, vocab), max_tokens=MAX_TOKENS, temperature=TEMPERATURE)
    return parse_explanation(reply.text)
