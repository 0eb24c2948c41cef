"""Where saescope keeps what outlives a run: converted models, under $SAESCOPE_HOME or ~/.cache/saescope."""

from __future__ import annotations

import os
from pathlib import Path


def saescope_home() -> Path:
    """$SAESCOPE_HOME, else ~/.cache/saescope (read when called, never at import)."""
    configured = os.environ.get("SAESCOPE_HOME")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "saescope"


def converted_models_dir() -> Path:
    """Safetensors copies of GGUF models (parsing GGUF metadata alone takes ~20 s)."""
    return saescope_home() / "models"
