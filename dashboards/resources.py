"""What every page shares: which run and SAE to show, and resources loaded once per server process.

The run comes from the command line after ``--`` (``saescope serve`` passes
``--run R [--sae NAME]``) or, for tests, from ``SAESCOPE_RUN``/``SAESCOPE_SAE``.
The feature index and explanations are opened per (path, modification time,
size): when a job replaces the file, the next page load opens the new one, and
the old handle is never closed under a session still reading it. The model and
SAE are loaded once per SAE weights sha256 and shared by all sessions, so a
retrained SAE is picked up on the next page load; steering and probing attach
hooks to that shared model, so they hold ``hook_lock()`` while they run.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from pipeline.lm.hook_points import HookPoint
from pipeline.lm.models import load_model
from pipeline.lm.token_text import REPLACEMENT, load_tokenizer
from pipeline.lm.token_text import vocab_bytes as token_bytes_of
from pipeline.runtime.errors import first_line
from pipeline.sae.saelens import sae_from_saelens, sae_hook_point
from storage.constants import DEFAULT_SAE_NAME, FEATURE_INDEX
from storage.explanations import ExplanationReader, explanations_path, open_explanations
from storage.home import converted_models_dir
from storage.index_queries import FeatureIndex, open_sae_index
from storage.sae_store import (
    finished_sae_names,
    load_sae_files,
    resolve_sae,
    sae_dir,
    weights_fingerprint,
)
from storage.shards import activations_dir, read_manifest


@dataclass(frozen=True)
class AppSettings:
    run: Path
    sae: str | None


def app_settings() -> AppSettings:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--run", default=os.environ.get("SAESCOPE_RUN"))
    parser.add_argument("--sae", default=os.environ.get("SAESCOPE_SAE"))
    args, _ = parser.parse_known_args(sys.argv[1:])
    if not args.run:
        raise ValueError("no run given: start the app with `saescope serve --run runs/NAME`")
    return AppSettings(Path(args.run), args.sae)


def sae_names(settings: AppSettings) -> list[str]:
    return finished_sae_names(settings.run)


def selected_sae(settings: AppSettings) -> Path:
    """The SAE folder chosen by ?sae=NAME, else --sae, else the run's only (or first) SAE."""
    names = sae_names(settings)
    wanted = st.query_params.get("sae") or settings.sae
    if wanted is None and len(names) > 1:
        wanted = DEFAULT_SAE_NAME if DEFAULT_SAE_NAME in names else names[0]
    if wanted is not None:
        return sae_dir(settings.run, wanted) if wanted in names else resolve_sae(settings.run, wanted)
    return resolve_sae(settings.run, None)


@st.cache_resource
def _open_indexes() -> dict:
    """path -> ((mtime, size), handle): the newest open index or explanations reader per file, shared by sessions."""
    return {"lock": threading.Lock(), "open": {}}


def feature_index(sae_folder: Path) -> FeatureIndex:
    """The read-only index of ``sae_folder``; a replaced file is opened anew on the next call."""
    path = Path(sae_folder) / FEATURE_INDEX
    if not path.is_file():
        raise FileNotFoundError(
            f"{sae_folder.name!r} has no feature index yet: build it with "
            f"`saescope index --run {sae_folder.parent.parent} --sae {sae_folder.name}`"
        )
    return _opened(path, lambda: open_sae_index(Path(sae_folder)))


def _opened(path: Path, opener):
    """The shared open handle of ``path`` (``opener()``'s result), opened anew when the file was replaced.

    A superseded handle is never closed here: another session may be in the middle of a query on
    it. Each handle has a DuckDB instance of its own (see ``open_read_only``), so it keeps
    answering from the file it opened and closes when the last session drops it.
    """
    stat = path.stat()
    version = (stat.st_mtime_ns, stat.st_size)
    registry = _open_indexes()
    with registry["lock"]:
        current = registry["open"].get(str(path))
        if current is not None and current[0] == version:
            return current[1]
        handle = opener()
        registry["open"][str(path)] = (version, handle)
        return handle


def explanations(sae_folder: Path) -> ExplanationReader | None:
    """The SAE's explanations (None when `saescope explain` has not run on its weights); reopened when replaced."""
    path = explanations_path(sae_folder)
    if not path.is_file():
        return None
    return _opened(path, lambda: open_explanations(Path(sae_folder), weights_fingerprint(Path(sae_folder))))


def feature_labels(sae_folder: Path, features) -> dict[int, str]:
    """feature -> its label text (features without one are absent; empty before `saescope explain`)."""
    reader = explanations(sae_folder)
    if reader is None or not features:
        return {}
    try:
        return {int(f): row["text"] for f, row in reader.labels([int(f) for f in features]).items()}
    except ValueError:
        return {}  # the reader was replaced under this page: labels come back on the next load


@st.cache_resource(show_spinner="loading the sentence-embedding model (once per server)…")
def embedder():
    """MiniLM for search by meaning, shared by every session."""
    from pipeline.explain.embedding import Embedder

    return Embedder()


def live_model(run: str, sae_folder: str):
    """(loaded model, SAE, the hook point it reads) on the CPU for the SAE's weights now, shared by every session.

    Keyed by the weights' sha256: after `saescope train --force` the next page load gets the new SAE.
    """
    return _live_model(run, sae_folder, weights_fingerprint(Path(sae_folder)))


@st.cache_resource(max_entries=2, show_spinner="loading the model and the SAE (once per server)…")
def _live_model(run: str, sae_folder: str, weights_sha256: str):
    manifest = read_manifest(activations_dir(Path(run)))
    loaded = load_model(
        manifest.model_spec, "cpu", convert_dir=converted_models_dir(), expect_revision=manifest.model_revision
    )
    tensors, cfg = load_sae_files(Path(sae_folder))
    sae = sae_from_saelens(tensors, cfg).eval()
    if weights_fingerprint(Path(sae_folder)) != weights_sha256:
        raise ValueError("the SAE was replaced while it loaded: reload the page")
    point = sae_hook_point(cfg) or HookPoint(manifest.layer, manifest.hook_kind)
    return loaded, sae, point


@st.cache_resource(max_entries=4)
def vocab_bytes(run: str, vocab_size: int) -> list[bytes | None] | None:
    """Per token id, its bytes (byte-level BPE tokenizers; None for others), from the live model's tokenizer."""
    manifest = read_manifest(activations_dir(Path(run)))
    tokenizer = load_tokenizer(manifest.model_spec, converted_models_dir())
    return token_bytes_of(tokenizer, list(range(vocab_size)))


@st.cache_resource
def hook_lock() -> threading.Lock:
    """Held while a steering or probing hook is attached to the shared model."""
    return threading.Lock()


def show_error(error: Exception) -> None:
    """One readable message instead of a traceback."""
    st.error(first_line(error))


def index_token_bytes(settings: AppSettings, index: FeatureIndex, ids) -> list[bytes | None] | None:
    """Per id, its bytes where a token is part of a character alone (the tokenizer loads only then), else None."""
    ids = [int(i) for i in ids]
    if not any(REPLACEMENT in index.vocab_text(i) for i in ids):
        return None
    try:
        table = vocab_bytes(str(settings.run), len(index.vocab))
    except (ValueError, OSError):
        return None  # no tokenizer here: the tokens show as decoded
    return [table[i] if 0 <= i < len(table) else None for i in ids]
