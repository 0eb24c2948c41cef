"""Where text comes from: the offline default corpus, a Hugging Face dataset, or local files.

The default corpus is real human-written English that ships with Python itself:
the language-reference topics in ``pydoc_data.topics`` and the docstrings of
the standard library (read with ``ast`` from the source files, never imported),
de-duplicated, at least 80 characters each, about 2 million characters on
CPython 3.11, in a fixed shuffled order (seeded) so any slice of it is
representative. Anything else goes through ``datasets``: a hub dataset (streamed)
or local .txt/.jsonl/.parquet files.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import random
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.runtime.errors import first_line

DEFAULT_CORPUS = "default"
MIN_DOCSTRING_CHARS = 80
SKIPPED_STDLIB_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class CorpusError(ValueError):
    """A corpus spec could not be read, or holds no usable text."""


@dataclass(frozen=True)
class CorpusSpec:
    """Which text to read."""

    source: str = DEFAULT_CORPUS
    """"default", a Hugging Face dataset name, or a local file, directory or glob."""
    config: str | None = None
    """Dataset configuration name (hub datasets only)."""
    split: str = "train"
    """Dataset split."""
    text_column: str = "text"
    """Column holding the text (hub datasets, .jsonl and .parquet)."""

    def describe(self) -> str:
        if self.source == DEFAULT_CORPUS:
            return f"Python {sys.version_info.major}.{sys.version_info.minor} docs (pydoc topics + stdlib docstrings)"
        parts = (
            [self.source]
            + ([self.config] if self.config else [])
            + [f"split={self.split}", f"column={self.text_column}"]
        )
        return " ".join(parts)


def _stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = (path for path in root.rglob("*.py") if not SKIPPED_STDLIB_DIRS.intersection(path.relative_to(root).parts))
    return sorted(files)


def _docstrings(source: str) -> Iterator[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text and len(text) >= MIN_DOCSTRING_CHARS:
                yield text


@functools.lru_cache(maxsize=1)
def default_corpus_documents(seed: int = 0) -> tuple[str, ...]:
    """The default corpus as a deterministic tuple of de-duplicated documents (memoized)."""
    import pydoc_data.topics

    documents = [pydoc_data.topics.topics[key].strip() for key in sorted(pydoc_data.topics.topics)]
    for path in _stdlib_sources():
        try:
            documents.extend(_docstrings(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
    unique = list(dict.fromkeys(doc for doc in documents if doc))
    random.Random(seed).shuffle(unique)
    return tuple(unique)


def _local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS)
    else:
        files = sorted(Path().glob(source)) if any(ch in source for ch in "*?[") else []
    return files


def _builder_for(files: list[Path]) -> str:
    builders = {LOCAL_BUILDERS.get(f.suffix) for f in files}
    if None in builders:
        bad = next(f for f in files if f.suffix not in LOCAL_BUILDERS)
        raise CorpusError(f"unsupported corpus file {bad}: use .txt, .jsonl or .parquet")
    if len(builders) > 1:
        raise CorpusError(f"corpus files mix formats ({sorted(builders)}): use one kind per corpus")
    return builders.pop()


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix in LOCAL_BUILDERS


def _dataset_texts(dataset, text_column: str, where: str) -> Iterator[str]:
    for row in dataset:
        if text_column not in row:
            raise CorpusError(f"{where} has no column {text_column!r}; columns: {sorted(row)} (use --text-column)")
        text = row[text_column]
        if isinstance(text, str) and text.strip():
            yield text


def iter_documents(spec: CorpusSpec) -> Iterator[str]:
    """Yield the corpus's documents in a fixed order."""
    if spec.source == DEFAULT_CORPUS:
        yield from default_corpus_documents()
        return
    from datasets import load_dataset

    files = _local_files(spec.source)
    if files:
        builder = _builder_for(files)
        extra = {"sample_by": "document"} if builder == "text" else {}
        column = "text" if builder == "text" else spec.text_column
        dataset = load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True, **extra)
        yield from _dataset_texts(dataset, column, f"corpus files {spec.source}")
        return
    if _looks_local(spec.source):
        raise CorpusError(f"corpus {spec.source!r}: no such file or directory, or no .txt/.jsonl/.parquet files in it")
    try:
        dataset = load_dataset(spec.source, spec.config, split=spec.split, streaming=True)
    except Exception as error:  # datasets raises many kinds; one clear line is what the user needs
        raise CorpusError(
            f"could not open dataset {spec.source!r} (config={spec.config}, split={spec.split}) "
            f"from the Hugging Face hub: {first_line(error)}"
        ) from error
    yield from _dataset_texts(dataset, spec.text_column, f"dataset {spec.source!r}")


def check_corpus(spec: CorpusSpec) -> None:
    """Raise CorpusError unless the corpus opens and yields at least one document (reads only the first)."""
    if next(iter_documents(spec), None) is None:
        raise CorpusError(f"corpus {spec.describe()!r} holds no text: give a file or folder with non-empty documents")


def fingerprint(spec: CorpusSpec) -> str:
    """A content identity for the corpus, used to refuse mixing corpora in one cache."""
    digest = hashlib.sha256()
    if spec.source == DEFAULT_CORPUS:
        for document in default_corpus_documents():
            digest.update(document.encode("utf-8"))
            digest.update(b"\x00")
        return "sha256:" + digest.hexdigest()
    files = _local_files(spec.source)
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    if not files:
        digest.update(f"{spec.source}|{spec.config}|{spec.split}".encode())
    digest.update(spec.text_column.encode())
    return "sha256:" + digest.hexdigest()
