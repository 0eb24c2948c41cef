"""`saescope steer --chat`: the prompt goes through the tokenizer's chat template (transformers 4 and 5).

The tiny tests give the tiny model's tokenizer a small chat template; the slow one
runs the CLI on the real default model (its chat template is SmolLM2's own), using
the shared ``real_indexed``/``real_home`` fixtures of the end-to-end suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_packing import CHAT_TEMPLATE, rendered_ids

import jobs.steer
from jobs.cli import main


def with_chat_template(run: Path, tmp_path: Path) -> Path:
    """Point the run at a private copy of its model folder whose tokenizer has a chat template."""
    from transformers import AutoTokenizer

    manifest_path = run / "activations" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    model_dir = tmp_path / "chat-model"
    shutil.copytree(manifest["provenance"]["model"]["spec"], model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    manifest["provenance"]["model"]["spec"] = str(model_dir)  # same weights and config: same revision
    manifest_path.write_text(json.dumps(manifest))
    return model_dir


def steer_args(run: Path, *extra: str) -> list[str]:
    return [
        "steer", "--run", str(run), "--feature", "1", "--value", "3", "--prompt", "hi there",
        "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu", "--json", *extra,
    ]  # fmt: skip


def test_steer_chat_wraps_the_prompt_in_the_template(indexed_copy, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    model_dir = with_chat_template(indexed_copy, tmp_path)
    prompts = []
    real_compare = jobs.steer.compare

    def spy(model, sae, layer, spec, prompt, *rest, **kwargs):
        prompts.append(list(prompt))
        return real_compare(model, sae, layer, spec, prompt, *rest, **kwargs)

    monkeypatch.setattr(jobs.steer, "compare", spy)
    assert main(steer_args(indexed_copy, "--chat")) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown["default"]["token_ids"]) >= 1 and len(shown["steered"]["token_ids"]) >= 1
    assert prompts == [rendered_ids(AutoTokenizer.from_pretrained(model_dir), "hi there")]
    assert main(steer_args(indexed_copy)) == 0  # without --chat: BOS + the text, not the template
    capsys.readouterr()
    assert prompts[1][0] == 1 and prompts[1] != prompts[0]


def test_steer_chat_without_a_template_is_one_clear_line(indexed_copy, capsys):
    assert main(steer_args(indexed_copy, "--chat")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: this tokenizer has no chat template: use a chat (instruct) model, or leave out --chat"]


def run_saescope(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SAESCOPE_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "jobs.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_steer_chat_on_the_default_model(real_indexed, real_home):
    args = ["steer", "--run", str(real_indexed), "--feature", "3", "--value", "2", "--prompt", "What is Python?"]
    result = run_saescope(*args, "--chat", "--max-new-tokens", "6", "--temperature", "0", "--json", home=real_home)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert len(shown["default"]["token_ids"]) >= 1 and shown["default"]["text"].strip()
    assert len(shown["steered"]["token_ids"]) >= 1
