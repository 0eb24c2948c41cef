"""Saved comparisons of two SAEs: ``runs/<name>/comparisons/<A>__<B>.json``, written atomically.

`saescope compare` writes one JSON object per pair (the matched pairs, PW-MCC and its control,
correlations, split families, and both SAEs' weight fingerprints); the dashboard's Compare page
reads it and treats it as stale once either SAE's weights change. A comparison with an SAE of
another run is saved as ``<A>__<other run folder>.<B>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from storage.atomic import atomic_write_json

COMPARISONS_DIR = "comparisons"


def comparison_path(run_dir: Path, sae_a: str, sae_b: str, run_b: Path | None = None) -> Path:
    """The file of SAE ``sae_a`` of ``run_dir`` compared with ``sae_b`` of ``run_b`` (default: the same run)."""
    same_run = run_b is None or Path(run_b).resolve() == Path(run_dir).resolve()
    other = sae_b if same_run else f"{Path(run_b).name}.{sae_b}"
    return Path(run_dir) / COMPARISONS_DIR / f"{sae_a}__{other}.json"


def write_comparison(path: Path, payload: dict) -> None:
    """Publish one comparison (a JSON object without NaN: store missing numbers as null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, payload)


def read_comparison(path: Path) -> dict | None:
    """The saved comparison, or None when it is missing or damaged."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None
