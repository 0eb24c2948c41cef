"""``run.toml``: the resolved configuration that produced a run, one table per job."""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomli_w

from storage.atomic import atomic_write_text
from storage.constants import RUN_CONFIG


class RunConfigError(ValueError):
    """run.toml is unreadable."""


def run_config_path(run_dir: Path) -> Path:
    return Path(run_dir) / RUN_CONFIG


def read_run_config(run_dir: Path) -> dict:
    """The parsed run.toml, or {} when the run has none yet."""
    path = run_config_path(run_dir)
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise RunConfigError(f"{path} is not valid TOML: {error}; fix or delete it") from error
    except UnicodeDecodeError as error:
        raise RunConfigError(f"{path} is not valid TOML: not UTF-8 text ({error.reason}); fix or delete it") from error


def _without_none(table: dict) -> dict:
    """TOML has no null: unset (None) values are left out and read back as their defaults."""
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in table.items() if v is not None}


def update_run_config(run_dir: Path, section: str, values: dict) -> None:
    """Replace one table (e.g. "cache" or "train.default") of run.toml atomically."""
    config = read_run_config(run_dir)
    target = config
    *parents, leaf = section.split(".")
    for parent in parents:
        target = target.setdefault(parent, {})
    target[leaf] = _without_none(values)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_config_path(run_dir), tomli_w.dumps(config))
