"""Bad input gives one clear line (exit 2), names what is wrong, and loses nothing.

Every case runs the real CLI entry point on the tiny indexed run; none may print
a traceback, and the run must stay usable afterwards.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's own errors: "usage: ..." then "error: ..."
        code = exit_.code
    err = capsys.readouterr().err
    return code, err


def one_line_error(code: int, err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    return lines[-1]


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "options.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("verb", "toml", "message"),
    [
        ("cache", 'dtype = "int8"', "dtype = 'int8' is not valid: expected one of 'float16', 'bfloat16', 'float32'"),
        ("cache", 'tokens = "many"', "tokens = 'many' is not valid: expected an integer"),
        ("train", "k = 4.5", "k = 4.5 is not valid: expected an integer"),
        ("train", "lr = true", "lr = True is not valid: expected a number or 'auto'"),
        ("train", 'arch = "sparse"', "arch = 'sparse' is not valid"),
        ("index", 'memory_limit = "lots"', "--memory-limit 'lots' is not a size"),
    ],
)
def test_bad_config_file_values_name_the_file_and_key(capsys, tmp_path, indexed_copy, verb, toml, message):
    config = write_config(tmp_path, toml)
    code, err = run_cli(capsys, verb, "--run", indexed_copy, "--config", config, "--device", "cpu")
    line = one_line_error(code, err)
    assert message in line
    if "memory" not in message:
        assert str(config) in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["features", "--limit", "0"], "--limit: must be at least 1"),
        (["features", "--offset", "-1"], "--offset: must be at least 0"),
        (["features", "--min-density", "0.5", "--max-density", "0.1"], "--min-density (0.5) is above --max-density"),
        (["features", "--min-density", "nan"], "expected a finite number"),
        (["show", "--feature", "1", "--examples", "0"], "--examples: must be at least 1"),
        (["show", "--feature", "-3"], "--feature: must be at least 0"),
        (["show", "--feature", "64"], "feature 64 out of range: this SAE has 64 features (0-63)"),
        (["steer", "--feature", "1", "--value", "nan", "--prompt", "x"], "steering values must be finite"),
        (["steer", "--feature", "1", "--value", "infx", "--prompt", "x"], "steering values must be finite"),
        (["steer", "--feature", "1", "--temperature", "nan", "--prompt", "x"], "expected a finite number"),
        (["steer", "--feature", "1", "--max-new-tokens", "0", "--prompt", "x"], "must be at least 1"),
        (["steer", "--feature", "1", "--prompt", "  "], "--prompt is empty"),
        (["steer", "--feature", "1", "--prompt", "x", "--device", "gpu0"], "unknown device 'gpu0'"),
        (["eval", "--lm-eval-contexts", "-1"], "--lm-eval-contexts: must be at least 0"),
        (["train", "--heldout-contexts", "0", "--force"], "--heldout-contexts must be at least 1"),
        (["train", "--name", "x", "--auxk-coef", "nan"], "--auxk-coef must be a finite number"),
        (["index", "--memory-limit", "1 potato"], "--memory-limit '1 potato' is not a size"),
        (
            ["train", "--arch", "matryoshka", "--d-sae", "64", "--matryoshka-widths", "16,8,64"],
            "--matryoshka-widths 16,8,64: widths must be strictly increasing",
        ),
        (
            ["train", "--arch", "matryoshka", "--d-sae", "64", "--matryoshka-widths", "8,16,32"],
            "--matryoshka-widths 8,16,32: the last width must be d_sae = 64",
        ),
        (["train", "--arch", "matryoshka", "--matryoshka-widths", "0,64"], "widths must be positive integers"),
        (["train", "--arch", "matryoshka", "--matryoshka-widths", "8;64"], "is not a comma list of integers"),
        (["train", "--arch", "topk,relu", "--matryoshka-widths", "8,64"], "only for --arch matryoshka"),
        (
            ["train", "--arch", "matryoshka", "--name", "m", "--matryoshka-widths", "8,16"],
            "--matryoshka-widths 8,16: the last width must be d_sae = 256",
        ),
        (["cache", "--device", "tpu"], "unknown device 'tpu'"),
        (["cache", "--hook", "mlp-mid"], "argument --hook: invalid choice: 'mlp-mid'"),
    ],
)
def test_bad_flags_are_one_line(capsys, indexed_copy, args, message):
    code, err = run_cli(capsys, *args[:1], "--run", indexed_copy, *args[1:])
    assert message in one_line_error(code, err)


def test_steering_beyond_the_models_positions_is_refused(capsys, indexed_copy):
    code, err = run_cli(
        capsys, "steer", "--run", indexed_copy, "--feature", "1", "--prompt", "hi", "--max-new-tokens", "600",
        "--device", "cpu",
    )  # fmt: skip
    assert "beyond the model's 512 positions" in one_line_error(code, err)


def test_missing_run_file_run_and_deleted_weights_are_three_messages(capsys, tmp_path, indexed_copy):
    code, missing = run_cli(capsys, "features", "--run", tmp_path / "nope")
    assert "run folder" in one_line_error(code, missing) and "does not exist" in missing
    (tmp_path / "afile").write_text("x")
    code, afile = run_cli(capsys, "show", "--run", tmp_path / "afile", "--feature", "1")
    assert "is a file, not a run folder" in one_line_error(code, afile)
    (indexed_copy / "saes" / "default" / "sae_weights.safetensors").unlink()
    code, deleted = run_cli(capsys, "features", "--run", indexed_copy)
    assert "sae_weights.safetensors is missing" in one_line_error(code, deleted)


DAMAGE = {
    "manifest": ("activations/manifest.json", b"{not json", "manifest.json is unreadable"),
    "run.toml": ("run.toml", b"[cache\nmodel = ", "run.toml is not valid TOML"),
    "cfg.json": ("saes/default/cfg.json", b"[1, 2", "cfg.json is damaged"),
    "weights": ("saes/default/sae_weights.safetensors", b"\x00" * 64, "sae_weights.safetensors is damaged"),
    "index": ("saes/default/features.duckdb", b"garbage" * 100, "is damaged or not a feature index"),
}


READS = {
    "features": {"index", "weights"},  # the index, checked against the weights' hash
    "show": {"index", "weights"},
    "train": {"manifest", "run.toml"},  # --force replaces cfg.json, the weights and the index
    "eval": {"manifest", "cfg.json", "weights"},
    "index": {"manifest", "cfg.json", "weights"},  # it rebuilds features.duckdb
}
"""Which damaged files each verb reads: those must stop it with exit 2; the others must not disturb it."""
REWRITES = {("index", "index"), ("train", "cfg.json"), ("train", "weights")}
"""(verb, file) pairs where the verb replaces the damaged file with a good one instead of reading it."""


@pytest.mark.parametrize("damaged", sorted(DAMAGE))
@pytest.mark.parametrize("verb", sorted(READS))
def test_damaged_files_name_the_file_whichever_verb_reads_them(capsys, indexed_copy, damaged, verb):
    relative, garbage, message = DAMAGE[damaged]
    (indexed_copy / relative).write_bytes(garbage)
    extra = {"show": ["--feature", "1"], "train": ["--name", "default", "--force", "--device", "cpu"]}
    extra["eval"] = extra["index"] = ["--device", "cpu"]
    code, err = run_cli(capsys, verb, "--run", indexed_copy, *extra.get(verb, []))
    if damaged not in READS[verb]:
        assert code == 0 and "error" not in err.lower(), err
        if (verb, damaged) in REWRITES:
            from jobs.run import read_sae

            assert (indexed_copy / relative).read_bytes() != garbage
            assert read_sae(indexed_copy / "saes" / "default")[0].cfg.d_in == 32  # the rewritten SAE reads back
            if verb == "index":
                assert main(["show", "--run", str(indexed_copy), "--feature", "1"]) == 0  # the new index serves
        return
    line = one_line_error(code, err)
    if damaged == "weights" and verb in ("features", "show"):
        message = "was built from other weights"  # the index check reads the weights' hash, not their tensors
    assert message in line and line.startswith("error: "), line
    named = "features.duckdb" if message == "was built from other weights" else Path(relative).name
    assert named in line, line  # the file to look at (the stale index, when the weights changed under it)


def test_train_checks_shards(capsys, indexed_copy):
    shard = sorted((indexed_copy / "activations").glob("*.safetensors"))[3]
    shard.write_bytes(shard.read_bytes()[:-100])
    code, err = run_cli(capsys, "train", "--run", indexed_copy, "--name", "second", "--device", "cpu")
    line = one_line_error(code, err)
    assert shard.name in line and "truncated" in line


def test_index_of_a_replaced_sae_is_refused_until_rebuilt(capsys, indexed_copy):
    from jobs.run import read_sae

    code, _ = run_cli(capsys, "import-sae", indexed_copy / "saes" / "default", "--run", indexed_copy, "--name", "copy")
    assert code == 0
    sae_folder = indexed_copy / "saes" / "default"
    sae, _ = read_sae(sae_folder)
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(sae_folder / "sae_weights.safetensors")
    weights["W_dec"] = weights["W_dec"] * 2
    save_file(weights, sae_folder / "sae_weights.safetensors")
    assert torch.is_tensor(sae.W_dec)
    for args in (["features"], ["show", "--feature", "1"]):
        code, err = run_cli(capsys, *args, "--run", indexed_copy, "--sae", "default")
        assert "was built from other weights" in one_line_error(code, err) and "saescope index" in err
    assert main(["index", "--run", str(indexed_copy), "--sae", "default", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["features", "--run", str(indexed_copy), "--sae", "default"]) == 0


HOLD_LOCK = """
import sys, time
from storage.locks import exclusive
with exclusive(sys.argv[1], "held"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize(
    ("verb", "lock", "extra"),
    [
        # the run's own cache options with more tokens: a valid request that must wait for the lock
        (
            "cache",
            ".cache.lock",
            [
                "--model",
                "{model}",
                "--dataset",
                "{corpus}",
                "--tokens",
                "99999",
                "--ctx-len",
                "32",
                "--shard-tokens",
                "1024",
                "--dtype",
                "float32",
                "--model-dtype",
                "float32",
            ],
        ),
        ("train", "saes/default/.train.lock", ["--force"]),
        ("index", "saes/default/.index.lock", []),
    ],
)
def test_a_second_writer_is_refused_with_the_owners_pid(capsys, indexed_copy, tiny_model_dir, verb, lock, extra):
    import json

    manifest = json.loads((indexed_copy / "activations" / "manifest.json").read_text())
    corpus = manifest["provenance"]["corpus"]["spec"]["source"]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(indexed_copy / lock)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = [a.format(model=tiny_model_dir, corpus=corpus) for a in extra]
        code, err = run_cli(capsys, verb, "--run", indexed_copy, "--device", "cpu", *args)
        assert f"in use by process {holder.pid}" in one_line_error(code, err)
    finally:
        holder.kill()
        holder.wait()
    # the killed holder released its lock: readers were never blocked and the run is usable
    assert main(["features", "--run", str(indexed_copy)]) == 0
    assert main(["index", "--run", str(indexed_copy), "--device", "cpu"]) == 0
