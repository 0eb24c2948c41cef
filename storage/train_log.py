"""``train_log.jsonl``: one JSON line per logged training step, appended while training runs.

A resumed run first drops the lines written after the checkpoint it resumes from
(rewritten atomically), so the log always matches the weights' history.
"""

from __future__ import annotations

import json
from pathlib import Path

from storage.atomic import atomic_write_text
from storage.constants import TRAIN_LOG


def log_path(sae_folder: Path) -> Path:
    return Path(sae_folder) / TRAIN_LOG


def append_log(sae_folder: Path, line: dict) -> None:
    """Add one step's statistics (a dict with at least ``step``)."""
    with open(log_path(sae_folder), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def truncate_log(sae_folder: Path, step: int) -> None:
    """Keep only the lines of steps up to ``step`` (the checkpoint a run resumes from)."""
    path = log_path(sae_folder)
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def read_log(sae_folder: Path) -> list[dict]:
    """Every logged step, oldest first (empty when the SAE has no log, e.g. an imported one)."""
    path = log_path(sae_folder)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
