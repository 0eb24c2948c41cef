"""Bad input gives one clear line (exit 2), names what is wrong, and loses nothing.

Every case runs the real CLI entry point on the tiny indexed run; none may print
a traceback, and the run must stay usable afterwards.
"""

from __future__ import annotations

import json
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


# --- issue 29 (part B): nothing lost, nothing left behind, nothing nonsensical accepted ---------------------------


def tree_hash(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (lock files included) -> the sha256 of its bytes."""
    import hashlib

    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file()
    }


def refused_unchanged(capsys, folder: Path, *args) -> str:
    """Run the CLI; it must exit 2 with one line and leave ``folder`` byte for byte as it was."""
    before = tree_hash(folder)
    code, err = run_cli(capsys, *args)
    line = one_line_error(code, err)
    assert tree_hash(folder) == before, line
    return line


@pytest.fixture
def no_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def transcoder_copy(transcoder_run, tmp_path) -> Path:
    import shutil

    target = tmp_path / "tc-run"
    shutil.copytree(transcoder_run, target)
    return target


def test_transcoder_force_on_a_missing_device_keeps_the_set(capsys, transcoder_copy, no_cuda):
    line = refused_unchanged(
        capsys, transcoder_copy, "train", "--run", transcoder_copy, "--transcoder", "--name", "tc", "--layers", "0-2",
        "--force", "--device", "cuda",
    )  # fmt: skip
    assert "CUDA is not available" in line and "--device cpu" in line


def test_sae_force_keeps_the_sae_when_a_check_fails(capsys, indexed_copy, no_cuda):
    args = ["train", "--run", indexed_copy, "--name", "default", "--force"]
    assert "CUDA is not available" in refused_unchanged(capsys, indexed_copy, *args, "--device", "cuda")
    (indexed_copy / "run.toml").write_bytes(b"\xff\xfe binary")
    line = refused_unchanged(capsys, indexed_copy, *args, "--device", "cpu")
    assert "run.toml is not valid TOML: not UTF-8" in line and str(indexed_copy / "run.toml") in line


def test_a_deleted_shard_stops_train_before_anything_is_written_or_deleted(capsys, indexed_copy):
    shard = sorted((indexed_copy / "activations").glob("*.safetensors"))[5]
    shard.unlink()
    for extra in (["--force"], ["--name", "short", "--tokens", "512", "--batch-size", "256"]):  # short: never reads it
        line = refused_unchanged(capsys, indexed_copy, "train", "--run", indexed_copy, "--device", "cpu", *extra)
        assert shard.name in line and "missing" in line and "saescope verify" in line


def write_nan_saelens(folder: Path, source: Path) -> Path:
    """A copy of the SAE folder ``source`` with one NaN in W_enc."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    weights = load_file(folder / "sae_weights.safetensors")
    weights["W_enc"][0, 0] = torch.nan
    save_file(weights, folder / "sae_weights.safetensors")
    return folder


def test_imports_with_nan_weights_are_refused(capsys, tmp_path, indexed_copy):
    from test_import_sparsify import write_coder

    bad = write_nan_saelens(tmp_path / "nan-sae", indexed_copy / "saes" / "default")
    for name in ("fresh", "default"):  # a new name, and --force over the finished SAE: both keep the run as it was
        line = refused_unchanged(
            capsys, indexed_copy, "import-sae", bad, "--run", indexed_copy, "--name", name, "--force"
        )
        assert "sae_weights.safetensors is damaged: W_enc holds 1 NaN" in line and "fix it or download it" in line
    tensors = write_coder(tmp_path / "layers.2", 0, False, False)
    tensors["b_dec"][3] = float("inf")
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "layers.2" / "sae.safetensors")
    line = refused_unchanged(capsys, indexed_copy, "import-sae", tmp_path / "layers.2", "--run", indexed_copy)
    assert "sae.safetensors is damaged: b_dec holds 1 NaN or infinite" in line


def test_a_sparsify_set_of_mixed_widths_is_refused(capsys, tmp_path, indexed_copy):
    from safetensors.torch import save_file
    from test_import_sparsify import write_coder

    source = tmp_path / "mixed"
    write_coder(source / "layers.0.mlp", 0, True, True)
    narrow = write_coder(source / "layers.1.mlp", 1, True, True)
    narrow = {k: v[:8] if k in ("encoder.weight", "encoder.bias", "W_dec") else v for k, v in narrow.items()}
    save_file(narrow, source / "layers.1.mlp" / "sae.safetensors")
    cfg = json.loads((source / "layers.1.mlp" / "cfg.json").read_text())
    (source / "layers.1.mlp" / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 8}))
    line = refused_unchanged(capsys, indexed_copy, "import-sae", source, "--run", indexed_copy)
    assert "layer 0: 16, layer 1: 8" in line and "one width" in line


@pytest.mark.parametrize("name", ["two\nlines", "x" * 300, "a b", "../up", ".hidden", ""])
@pytest.mark.parametrize("verb", ["train", "train-transcoder", "import-sae"])
def test_names_must_be_safe_folder_names(capsys, indexed_copy, verb, name):
    args = {
        "train": ["train", "--run", indexed_copy, "--device", "cpu"],
        "train-transcoder": ["train", "--run", indexed_copy, "--transcoder", "--device", "cpu"],
        "import-sae": ["import-sae", indexed_copy / "saes" / "default", "--run", indexed_copy],
    }[verb]
    line = refused_unchanged(capsys, indexed_copy, *args, "--name", name)
    assert "--name" in line
    assert ("at most 100" in line) if len(name) == 300 else ("use letters, digits" in line)


def test_sae_of_other_options_is_not_already_trained(capsys, indexed_copy):
    base = ["train", "--run", indexed_copy, "--device", "cpu"]
    line = refused_unchanged(capsys, indexed_copy, *base, "--d-sae", "128")
    assert "--d-sae: trained with 64, requested 128" in line and "--force" in line
    line = refused_unchanged(capsys, indexed_copy, *base, "--k", "8", "--expansion", "4")
    assert "--k: trained with 4, requested 8" in line and "--d-sae: trained with 64, requested 128" in line
    config = write_config(indexed_copy.parent, "seed = 3\n")
    assert "--seed: trained with 0, requested 3" in refused_unchanged(capsys, indexed_copy, *base, "--config", config)
    # the options it was trained with, or none at all: already trained (only the options given are compared)
    for extra in (["--d-sae", "64", "--k", "4", "--expansion", "2"], []):
        assert main([str(a) for a in (*base, *extra)]) == 0
        assert "already trained; nothing to do" in capsys.readouterr().out


def test_transcoder_set_of_other_layers_is_not_already_trained(capsys, transcoder_copy):
    base = ["train", "--run", transcoder_copy, "--transcoder", "--name", "tc", "--device", "cpu"]
    line = refused_unchanged(capsys, transcoder_copy, *base, "--layers", "0-2")
    assert "--layers: trained with 0,1,2,3, requested 0,1,2" in line and "--force" in line
    assert "--k: trained with 4, requested 5" in refused_unchanged(capsys, transcoder_copy, *base, "--k", "5")
    assert main([str(a) for a in (*base, "--layers", "all")]) == 0
    assert "already trained" in capsys.readouterr().out


def test_damaged_files_outside_a_run_do_not_suggest_train(capsys, tmp_path, indexed_copy, transcoder_copy):
    import shutil

    from storage.sae_store import SaeStoreError
    from storage.transcoder_store import load_layer_files, set_dir

    source = tmp_path / "broken-import"
    shutil.copytree(indexed_copy / "saes" / "default", source)
    (source / "cfg.json").write_text("{oops")
    line = refused_unchanged(capsys, indexed_copy, "import-sae", source, "--run", indexed_copy, "--name", "x")
    assert "cfg.json is damaged" in line and "saescope train" not in line and "not an SAE of a run" in line
    folder = set_dir(transcoder_copy, "tc")
    (folder / "layer-01" / "sae_weights.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SaeStoreError) as error:
        load_layer_files(folder, 1)
    assert f"saescope train --run {transcoder_copy} --transcoder --name tc --layers 0,1,2,3 --force" in str(error.value)


def test_manifest_without_its_shard_list_is_damaged_not_empty(capsys, indexed_copy, tiny_model_dir):
    path = indexed_copy / "activations" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["shards"]
    path.write_text(json.dumps(manifest))
    line = refused_unchanged(capsys, indexed_copy, "verify", "--run", indexed_copy)
    assert "manifest.json is unreadable (missing key 'shards')" in line
    corpus = manifest["provenance"]["corpus"]["spec"]["source"]
    line = refused_unchanged(
        capsys, indexed_copy, "cache", "--run", indexed_copy, *tiny_cache_args(tiny_model_dir, corpus)
    )
    assert "missing key 'shards'" in line  # the next cache refuses too: the good shards are not overwritten


def tiny_cache_args(model: Path, corpus: str, tokens: int = 16384) -> list:
    return ["--model", model, "--dataset", corpus, "--tokens", tokens, "--ctx-len", 32, "--shard-tokens", 1024,
            "--dtype", "float32", "--model-dtype", "float32", "--device", "cpu"]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", ""], "--layers is empty: give all, 5, 0-29 or 1,3,8-10"),
        (["--layers", "2-1"], "--layers: layer range '2-1' is backwards"),
        (["--layers", "0-99999999999"], "layer 4 out of range: model has 4 layers (0-3)"),
        (["--layer", "30"], "layer 30 out of range: model has 4 layers (0-3)"),
    ],
)
def test_a_refused_cache_leaves_no_folder(capsys, tmp_path, tiny_model_dir, text_corpus, extra, message):
    run = tmp_path / "runs" / "new"
    code, err = run_cli(capsys, "cache", "--run", run, *tiny_cache_args(tiny_model_dir, str(text_corpus)), *extra)
    line = one_line_error(code, err)
    assert message in line and "--layer" in line and "1000000" not in line
    assert not (tmp_path / "runs").exists()  # neither the run folder nor its lock file


def test_train_layers_are_checked_before_the_model(capsys, indexed_copy):
    base = ["train", "--run", indexed_copy, "--transcoder", "--name", "t2", "--device", "cpu"]
    assert "--layers is empty" in refused_unchanged(capsys, indexed_copy, *base, "--layers", " ")
    line = refused_unchanged(capsys, indexed_copy, *base, "--layers", "0-99999999999")
    assert "model has 4 layers" in line and "1000000" not in line


def test_a_refused_train_leaves_no_sae_folder(capsys, indexed_copy):
    shard = sorted((indexed_copy / "activations").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\x7f" * 8  # the same size, other bytes: only the sha256 tells
    shard.write_bytes(bytes(data))
    line = refused_unchanged(capsys, indexed_copy, "train", "--run", indexed_copy, "--name", "fresh", "--device", "cpu")
    assert shard.name in line and "corrupt" in line
    assert not (indexed_copy / "saes" / "fresh").exists()


def test_cache_does_not_extend_past_an_altered_last_shard(capsys, indexed_copy, tiny_model_dir):
    manifest = json.loads((indexed_copy / "activations" / "manifest.json").read_text())
    last = indexed_copy / "activations" / manifest["shards"][-1]["file"]
    data = bytearray(last.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"
    last.write_bytes(bytes(data))
    corpus = manifest["provenance"]["corpus"]["spec"]["source"]
    args = tiny_cache_args(tiny_model_dir, corpus, tokens=99999)
    line = refused_unchanged(capsys, indexed_copy, "cache", "--run", indexed_copy, *args)
    assert last.name in line and "corrupt" in line and "saescope verify" in line


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        (("extra",), "missing key 'extra'"),
        (("provenance", "model_dtype"), "provenance.model_dtype.name is missing"),
        (("provenance", "hook", "name"), "provenance.hook.name is missing"),
    ],
)
def test_steer_with_a_manifest_missing_a_key_is_refused(capsys, indexed_copy, drop, message):
    path = indexed_copy / "activations" / "manifest.json"
    manifest = json.loads(path.read_text())
    table = manifest
    for key in drop[:-1]:
        table = table[key]
    del table[drop[-1]]
    path.write_text(json.dumps(manifest))
    args = ["steer", "--run", indexed_copy, "--feature", "1", "--prompt", "hi", "--device", "cpu"]
    line = refused_unchanged(capsys, indexed_copy, *args)
    assert message in line and str(path) in line


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("d_in", "32", "d_in is '32', not int"),
        ("k", 4.5, "k is 4.5, not int or null"),
        ("meta", {"hook_layer": "2"}, "meta.hook_layer is '2', not int"),
    ],
)
@pytest.mark.parametrize("verb", ["eval", "index"])
def test_cfg_json_fields_of_the_wrong_type_are_refused(capsys, indexed_copy, verb, field, value, message):
    path = indexed_copy / "saes" / "default" / "cfg.json"
    cfg = json.loads(path.read_text())
    cfg[field] = {**cfg[field], **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(cfg))
    line = refused_unchanged(capsys, indexed_copy, verb, "--run", indexed_copy, "--device", "cpu")
    assert message in line and str(path) in line and "saescope train --run" in line


def test_a_lock_leaves_nothing_behind(tmp_path):
    from storage.locks import LockedError, exclusive

    lock = tmp_path / "a" / "b" / ".lock"
    with pytest.raises(RuntimeError), exclusive(lock, "test"):
        assert lock.is_file()
        raise RuntimeError("refused")
    assert not (tmp_path / "a").exists()
    with exclusive(lock, "outer"):
        with pytest.raises(LockedError), exclusive(lock, "inner"):
            pass
        assert lock.is_file()  # the refused second holder removed nothing
        (lock.parent / "kept").write_text("x")
    assert not lock.exists() and (lock.parent / "kept").is_file()


def test_binary_option_files_are_named(capsys, tmp_path, indexed_copy):
    config = tmp_path / "options.toml"
    config.write_bytes(b"k = 4\n\xff\xfe")
    line = refused_unchanged(capsys, indexed_copy, "train", "--run", indexed_copy, "--config", config)
    assert f"cannot read config file {config}: not UTF-8" in line


@pytest.mark.parametrize(("layers", "suggested"), [([0, 1, 2], "--layers all --force"), ([0, 1, 2, 3], "trace --run")])
def test_a_partial_transcoder_set_does_not_suggest_trace(tmp_path, layers, suggested):
    from jobs.training.transcoders import TranscoderSummary, format_transcoder_summary

    record = {"layers": layers, "model": {"n_layers": 4}, "metrics": {"layers": {}, "all_layers": {}}}
    folder = tmp_path / "run" / "transcoders" / "tc"
    text = format_transcoder_summary(TranscoderSummary(folder, None, record, True, 0, 0.0))
    assert text.splitlines()[-1].startswith("next:") and suggested in text.splitlines()[-1]


def test_verbs_that_read_no_shard_work_without_the_activations(capsys, indexed_copy):
    for shard in (indexed_copy / "activations").glob("*.safetensors"):
        shard.unlink()  # e.g. a run copied to a laptop with its SAE and index only
    assert main(["features", "--run", str(indexed_copy)]) == 0
    assert main(["show", "--run", str(indexed_copy), "--feature", "1"]) == 0
    code, err = run_cli(capsys, "train", "--run", indexed_copy, "--name", "other", "--device", "cpu")
    assert "is listed in the manifest but missing" in one_line_error(code, err)
