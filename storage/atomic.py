"""Publish files atomically: write a temp file beside the target, fsync, rename.

A reader never sees a half-written file, and a killed writer leaves only a
``*.tmp`` that nothing treats as finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def temp_path(path: Path) -> Path:
    """The temp file a writer of ``path`` uses (same folder, so rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; on any error the target is untouched."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, payload) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def remove_stale_temps(folder: Path) -> None:
    """Delete temp files that killed writers left in ``folder``."""
    for stale in Path(folder).glob(".*.tmp"):
        stale.unlink(missing_ok=True)
