"""Choose and load the LLM backend named by `--llm` (default, a local path or hub id, or openai:URL)."""

from __future__ import annotations

from jobs.common import converted_models_dir
from pipeline.llm_backends import OpenAIBackend, TransformersBackend
from pipeline.models import load_model
from pipeline.precision import resolve_device

OPENAI_PREFIX = "openai:"


def make_backend(spec: str, model_name: str | None, device: str):
    """An OpenAI-compatible client for ``openai:URL``, otherwise a local transformers model (float32)."""
    if spec.startswith(OPENAI_PREFIX):
        return OpenAIBackend(spec[len(OPENAI_PREFIX) :], model_name or "default")
    loaded = load_model(spec, device=resolve_device(device), convert_dir=converted_models_dir())
    return TransformersBackend(loaded.model, loaded.tokenizer, loaded.info.name)
