"""LLM backends for explaining and scoring: a local transformers model, or any OpenAI-compatible HTTP server.

Both answer ``complete(messages, max_tokens, temperature, top_logprobs)`` with a
``Completion``: the reply text and, where the backend gives them, the top
log-probabilities of the first reply token (what detection and fuzzing need).
Temperature 0 is greedy decoding, so a local model answers the same twice.

The HTTP client speaks the chat-completions protocol (vLLM, llama.cpp's server,
Ollama, OpenAI): POST ``{base}/chat/completions``; the API key, if any, comes
from an environment variable; timeouts and server errors (5xx, 429) are retried
with exponential back-off; a malformed reply is an ``LlmError`` naming what was
missing.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.lm.packing import chat_ids
from pipeline.runtime.errors import first_line

API_KEY_ENV = "SAESCOPE_LLM_API_KEY"
"""Environment variable holding the bearer token for an HTTP endpoint (OPENAI_API_KEY is used when unset)."""


class LlmError(ValueError):
    """The LLM could not be reached, or answered something unusable."""


@dataclass(frozen=True)
class Completion:
    text: str
    first_token_logprobs: dict[str, float] | None
    """Top alternatives for the first reply token and their log-probabilities (None if not given)."""


class TransformersBackend:
    """A local causal LM with a chat template (e.g. SmolLM2-135M-Instruct)."""

    def __init__(self, model, tokenizer, name: str):
        if not getattr(tokenizer, "chat_template", None):
            raise LlmError(f"{name} has no chat template: give --llm a chat (instruct) model")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.device = next(model.parameters()).device

    def _prompt_ids(self, messages: list[dict]) -> torch.Tensor:
        """[1, T] ids of the messages in the chat template (the same rule as the steer verb's --chat)."""
        return torch.tensor([chat_ids(self.tokenizer, messages)], device=self.device)

    @torch.no_grad()
    def complete(self, messages: list[dict], max_tokens: int = 64, temperature: float = 0.0, top_logprobs: int = 0):
        ids = self._prompt_ids(messages)
        logprobs = None
        if top_logprobs:
            first = torch.log_softmax(self.model(ids).logits[0, -1].float(), dim=-1)
            values, tokens = first.topk(top_logprobs)
            names = self.tokenizer.batch_decode(tokens[:, None])
            logprobs = {}
            for name, value in zip(names, values.tolist(), strict=True):
                logprobs.setdefault(name, value)
            if max_tokens == 1 and temperature <= 0:  # the greedy one-token reply is already known
                return Completion(self.tokenizer.decode(tokens[:1], skip_special_tokens=True).strip(), logprobs)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            **sampling,
        )
        text = self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return Completion(text.strip(), logprobs)


class OpenAIBackend:
    """A chat-completions HTTP endpoint; ``base_url`` ends before ``/chat/completions`` (e.g. .../v1)."""

    def __init__(self, base_url: str, model: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, backoff
        self.name = f"{model}@{base_url}"
        self.api_key = os.environ.get(API_KEY_ENV) or os.environ.get("OPENAI_API_KEY")

    def _request(self, payload: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode(), headers=headers, method="POST")
        last = None
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as error:
                if error.code < 500 and error.code != 429:
                    raise LlmError(f"{self.url} answered HTTP {error.code}: {first_line(error)}") from None
                last = f"HTTP {error.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                last = first_line(error)
            except json.JSONDecodeError:
                raise LlmError(f"{self.url} answered something that is not JSON") from None
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise LlmError(f"{self.url} failed after {self.retries + 1} attempts ({last}): is the server running?")

    def complete(self, messages: list[dict], max_tokens: int = 64, temperature: float = 0.0, top_logprobs: int = 0):
        payload = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if top_logprobs:
            payload.update(logprobs=True, top_logprobs=top_logprobs)
        reply = self._request(payload)
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LlmError(f"{self.url} replied without choices[0].message.content") from None
        if not isinstance(text, str):
            raise LlmError(f"{self.url} replied with a non-text message content")
        return Completion(text.strip(), _first_token_logprobs(choice))


def _first_token_logprobs(choice: dict) -> dict[str, float] | None:
    """The top log-probabilities of the first reply token, if the server sent them."""
    try:
        first = choice["logprobs"]["content"][0]
        alternatives = first.get("top_logprobs") or [first]
        return {entry["token"]: float(entry["logprob"]) for entry in alternatives}
    except (KeyError, IndexError, TypeError, ValueError):
        return None


OPENAI_PREFIX = "openai:"
"""`--llm openai:BASE_URL` names an HTTP endpoint; anything else is a local model spec."""


def backend_from_spec(spec: str, model_name: str | None, device: torch.device | str, convert_dir: Path | None):
    """An OpenAI-compatible client for ``openai:URL``, otherwise a local transformers model (float32).

    ``convert_dir`` is where a GGUF model's converted copy is kept (see ``pipeline.lm.models.load_model``).
    """
    if spec.startswith(OPENAI_PREFIX):
        return OpenAIBackend(spec[len(OPENAI_PREFIX) :], model_name or "default")
    from pipeline.lm.models import load_model

    loaded = load_model(spec, device=device, convert_dir=convert_dir)
    return TransformersBackend(loaded.model, loaded.tokenizer, loaded.info.name)
