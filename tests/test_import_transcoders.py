"""`saescope import-sae` of circuit-tracer sets and CLTs, SAELens and Gemma Scope transcoders: outputs by hand, traced.

Every layout is written here, tiny (D 32, F 24, the tiny Llama's 4 layers), from seeded numpy
arrays; the imported set's outputs are compared with the layout's formula in numpy, and
`saescope trace` runs through it with completeness. Bad sets are one line, exit 2, with the
run folder unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jobs.cli import main
from jobs.trace import load_transcoders
from storage.graph_groups import read_graph_json
from storage.transcoder_store import read_set, set_dir
from tests.test_bad_input_tracing import refused

D, F, K, L = 32, 24, 5, 4


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _per_layer(rng, d: int = D, f: int = F) -> dict[str, np.ndarray]:
    return {
        "W_enc": _f32(rng.normal(size=(f, d)) / np.sqrt(d)),
        "b_enc": _f32(rng.normal(size=f) * 0.1),
        "W_dec": _f32(rng.normal(size=(f, d)) * 0.1),
        "b_dec": _f32(rng.normal(size=d) * 0.01),
    }


def _yaml(fields: dict) -> str:
    lines = []
    for key, value in fields.items():
        if isinstance(value, list):
            lines += [f"{key}:"] + [f"  - {json.dumps(v)}" for v in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _act(pre: np.ndarray, activation: str, threshold=None) -> np.ndarray:
    if activation == "relu":
        return np.maximum(pre, 0)
    if activation == "jumprelu":
        return pre * (pre > threshold)
    out = np.zeros_like(pre)
    top = np.argsort(-pre, axis=1)[:, :K]
    np.put_along_axis(out, top, np.maximum(np.take_along_axis(pre, top, axis=1), 0), axis=1)
    return out


# ---- circuit-tracer per-layer sets --------------------------------------------------------------


def write_circuit_tracer_set(folder: Path, activation: str, skip: bool, seed: int = 0, **overrides) -> list[dict]:
    """layer_{i}.safetensors + config.yaml (listing the files, relative); returns each layer's arrays."""
    rng, layers = _rng(seed), []
    folder.mkdir(parents=True)
    for i in range(overrides.get("n_layers", L)):
        t = _per_layer(rng, overrides.get("d", D), overrides.get("widths", {}).get(i, F))
        if skip:
            t["W_skip"] = _f32(rng.normal(size=(len(t["b_dec"]),) * 2) * overrides.get("skip_scale", 0.05))
        if activation == "jumprelu":
            t["activation_function.threshold"] = _f32(np.abs(rng.normal(size=len(t["b_enc"]))) * 0.3)
        save_file(t, str(folder / f"layer_{i}.safetensors"))
        layers.append(t)
    config = {"model_kind": "transcoder_set", "feature_input_hook": overrides.get("hook_in", "mlp.hook_in"),
              "feature_output_hook": "hook_mlp_out", "scan": "test"}  # fmt: skip
    if activation == "topk":
        config.update(activation="topk", k=K)
    elif activation == "relu":
        config["activation"] = "relu"
    config["transcoders"] = [f"layer_{i}.safetensors" for i in range(len(layers))]
    (folder / "config.yaml").write_text(_yaml(config))
    return layers


def circuit_tracer_by_hand(t: dict, x: np.ndarray, activation: str) -> np.ndarray:
    """circuit-tracer's SingleLayerTranscoder: f = act(x W_enc^T + b_enc), y = f W_dec + b_dec + x W_skip^T."""
    pre = x @ t["W_enc"].T + t["b_enc"]
    y = _act(pre, activation, t.get("activation_function.threshold")) @ t["W_dec"] + t["b_dec"]
    return y + x @ t["W_skip"].T if "W_skip" in t else y


def _imported(run: Path, name: str):
    folder = set_dir(run, name)
    return load_transcoders(folder, read_set(folder))


def _x(seed: int = 7, n: int = 9) -> np.ndarray:
    return _f32(_rng(seed).normal(size=(n, D)))


@pytest.mark.parametrize(("activation", "skip"), [("topk", True), ("jumprelu", False), ("relu", True)])
def test_a_circuit_tracer_set_imports_with_its_outputs(run_copy, tmp_path, capsys, activation, skip):
    layers = write_circuit_tracer_set(tmp_path / "ct", activation, skip)
    assert main(["import-sae", str(tmp_path / "ct"), "--run", str(run_copy), "--name", "ct"]) == 0
    out = capsys.readouterr().out
    assert "next: saescope trace" in out and ("keeps the k largest pre-activations" in out) == (activation == "topk")
    tcs, _, clt = _imported(run_copy, "ct")
    assert clt is None and sorted(tcs) == list(range(L))
    x = _x()
    for i, t in enumerate(layers):
        got = tcs[i].reconstruct(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, circuit_tracer_by_hand(t, x, activation), rtol=1e-5, atol=1e-5)
    assert read_set(set_dir(run_copy, "ct"))["source_format"] == "circuit-tracer"


# ---- SAELens / Gemma Scope transcoders ----------------------------------------------------------


def write_gemma_scope(root: Path, version: int, seed: int = 1, widths: dict | None = None) -> list[dict]:
    """Gemma Scope 1 (layer_L/width_16k/average_l0_N/params.npz, W_enc [D, F]) or 2 (config.json + params.safetensors,
    w_enc / w_dec and an affine skip [D_in, D_out])."""
    rng, layers = _rng(seed), []
    for i in range(L):
        f = (widths or {}).get(i, F)
        t = _per_layer(rng, D, f)
        t["W_enc"] = _f32(t["W_enc"].T)
        t["threshold"] = _f32(np.abs(rng.normal(size=f)) * 0.3)
        if version == 1:
            folder = root / f"layer_{i}" / "width_16k" / f"average_l0_{10 + i}"
            folder.mkdir(parents=True)
            np.savez(folder / "params.npz", **t)
        else:
            t = {{"W_enc": "w_enc", "W_dec": "w_dec"}.get(k, k): v for k, v in t.items()}
            t["affine_skip_connection"] = _f32(rng.normal(size=(D, D)) * 0.05)
            folder = root / f"transcoder_{i}"
            folder.mkdir(parents=True)
            save_file(t, str(folder / "params.safetensors"))
            cfg = {"hf_hook_point_in": f"model.layers.{i}.post_attention_layernorm.output",
                   "hf_hook_point_out": f"model.layers.{i}.mlp.output", "width": f, "architecture": "jump_relu",
                   "affine_connection": True, "type": "transcoder"}  # fmt: skip
            (folder / "config.json").write_text(json.dumps(cfg))
        layers.append(t)
    return layers


def gemma_scope_by_hand(t: dict, x: np.ndarray) -> np.ndarray:
    """Gemma Scope's JumpReLU transcoder: f = JumpReLU(x W_enc + b_enc), y = f W_dec + b_dec (+ x A)."""
    W_enc, W_dec = t.get("W_enc", t.get("w_enc")), t.get("W_dec", t.get("w_dec"))
    pre = x @ W_enc + t["b_enc"]
    y = _act(pre, "jumprelu", t["threshold"]) @ W_dec + t["b_dec"]
    return y + x @ t["affine_skip_connection"] if "affine_skip_connection" in t else y


@pytest.mark.parametrize("version", [1, 2])
def test_gemma_scope_transcoders_import_with_their_outputs(run_copy, tmp_path, version):
    layers = write_gemma_scope(tmp_path / "gs", version)
    assert main(["import-sae", str(tmp_path / "gs"), "--run", str(run_copy), "--name", "gs"]) == 0
    tcs, _, _ = _imported(run_copy, "gs")
    x = _x(3)
    for i, t in enumerate(layers):
        np.testing.assert_allclose(tcs[i].reconstruct(torch.from_numpy(x)).numpy(), gemma_scope_by_hand(t, x),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    assert read_set(set_dir(run_copy, "gs"))["source_format"] == "gemma-scope"


# ---- circuit-tracer cross-layer transcoders -----------------------------------------------------


def write_clt(folder: Path, activation: str, seed: int = 2, n_layers: int = L, d: int = D, **bad) -> list[dict]:
    """circuit-tracer's CLT files: W_enc_{i}.safetensors (W_enc_i [F, D], b_enc_i, b_dec_i, threshold_i) and
    W_dec_{i}.safetensors (W_dec_i [F, L - i, D]), + config.yaml."""
    rng, layers = _rng(seed), []
    folder.mkdir(parents=True)
    for i in range(n_layers):
        enc = {f"W_enc_{i}": _f32(rng.normal(size=(F, d)) / np.sqrt(d)), f"b_enc_{i}": _f32(rng.normal(size=F) * 0.1),
               f"b_dec_{i}": _f32(rng.normal(size=d) * 0.01)}  # fmt: skip
        if activation == "jumprelu":
            enc[f"threshold_{i}"] = _f32(np.abs(rng.normal(size=F)) * 0.3)
        dec = {f"W_dec_{i}": _f32(rng.normal(size=(F, n_layers - i, d)) * 0.05)}
        if bad.get("nan_layer") == i:
            dec[f"W_dec_{i}"][0, 0, 0] = np.nan
        save_file(enc, str(folder / f"W_enc_{i}.safetensors"))
        save_file(dec, str(folder / f"W_dec_{i}.safetensors"))
        layers.append({**enc, **dec})
    config = {"model_kind": "cross_layer_transcoder", "feature_input_hook": bad.get("hook_in", "mlp.hook_in"),
              "feature_output_hook": "hook_mlp_out"}  # fmt: skip
    (folder / "config.yaml").write_text(_yaml(config))
    return layers


def clt_by_hand(layers: list[dict], x_LND: np.ndarray, activation: str) -> np.ndarray:
    """y_j = b_dec_j + sum over i <= j of act(x_i W_enc_i^T + b_enc_i) W_dec_i[:, j - i]."""
    feats = [
        _act(x_LND[i] @ t[f"W_enc_{i}"].T + t[f"b_enc_{i}"], activation, t.get(f"threshold_{i}"))
        for i, t in enumerate(layers)
    ]
    return np.stack([
        layers[j][f"b_dec_{j}"] + sum(feats[i] @ layers[i][f"W_dec_{i}"][:, j - i] for i in range(j + 1))
        for j in range(len(layers))
    ])  # fmt: skip


@pytest.mark.parametrize("activation", ["jumprelu", "relu"])
def test_a_circuit_tracer_clt_imports_as_a_cross_layer_set(run_copy, tmp_path, activation):
    layers = write_clt(tmp_path / "clt", activation)
    assert main(["import-sae", str(tmp_path / "clt"), "--run", str(run_copy), "--name", "clt"]) == 0
    folder = set_dir(run_copy, "clt")
    assert (folder / "config.yaml").is_file() and (folder / "W_dec_3.safetensors").is_file()
    assert read_set(folder)["kind"] == "cross_layer"
    _, _, clt = _imported(run_copy, "clt")
    x_LND = _f32(_rng(5).normal(size=(L, 6, D)))
    got = clt.reconstruct(torch.from_numpy(x_LND)).numpy()
    np.testing.assert_allclose(got, clt_by_hand(layers, x_LND, activation), rtol=1e-5, atol=1e-5)
    # the stored folder is circuit-tracer's layout again: its files hold the same arrays
    for i, t in enumerate(layers):
        stored = {**load_file(folder / f"W_enc_{i}.safetensors"), **load_file(folder / f"W_dec_{i}.safetensors")}
        assert set(stored) == set(t)
        for key, value in t.items():
            np.testing.assert_allclose(stored[key], value, rtol=1e-6, atol=1e-7)


def _trace(run: Path, name: str, capsys) -> dict:
    args = ["trace", "--run", str(run), "--transcoders", name, "--prompt", "The cat sat", "--name", f"g-{name}",
            "--label-contexts", "2"]  # fmt: skip
    code = main(args)
    assert code == 0, capsys.readouterr().err
    return read_graph_json(run, f"g-{name}")


def test_an_imported_clt_and_per_layer_set_trace_with_completeness(run_copy, tmp_path, capsys):
    write_clt(tmp_path / "clt", "jumprelu")
    # a small skip: the tiny Llama's residual is ~0.02 wide, so its frozen norms multiply float32 rounding in the
    # recomputed MLP input by ~50, and a skip path feeds that back into the residual at every layer
    write_circuit_tracer_set(tmp_path / "ct", "topk", skip=True, skip_scale=0.002)
    for name in ("clt", "ct"):
        assert main(["import-sae", str(tmp_path / name), "--run", str(run_copy), "--name", name]) == 0
        doc = _trace(run_copy, name, capsys)
        assert doc["saescope"]["transcoders"] == name and doc["saescope"]["layers"] == list(range(L))
        assert doc["saescope"]["logit_error"] < 1e-6
        assert any(n["feature_type"] == "cross layer transcoder" for n in doc["nodes"])


def test_a_clt_replaces_a_per_layer_set_of_the_same_name_with_force(run_copy, tmp_path, capsys):
    write_circuit_tracer_set(tmp_path / "ct", "relu", skip=False)
    write_clt(tmp_path / "clt", "relu")
    assert main(["import-sae", str(tmp_path / "ct"), "--run", str(run_copy), "--name", "x"]) == 0
    line = refused(capsys, [run_copy], "import-sae", tmp_path / "clt", "--run", run_copy, "--name", "x")
    assert "already has a transcoder set named 'x': pass --name or --force" in line
    assert main(["import-sae", str(tmp_path / "clt"), "--run", str(run_copy), "--name", "x", "--force"]) == 0
    folder = set_dir(run_copy, "x")
    assert read_set(folder)["kind"] == "cross_layer" and not (folder / "layer-00").exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["x"]


# ---- refusals: one line, exit 2, the run unchanged -----------------------------------------------


def _bad_sources(tmp: Path) -> list[tuple[Path, str]]:
    write_circuit_tracer_set(tmp / "wide", "relu", False, d=16)
    write_circuit_tracer_set(tmp / "short", "relu", False, n_layers=3)
    write_circuit_tracer_set(tmp / "resid", "relu", False, hook_in="hook_resid_mid")
    write_circuit_tracer_set(tmp / "mixed", "relu", False, widths={2: F + 8})
    write_clt(tmp / "clt3", "relu", n_layers=3)
    write_clt(tmp / "cltnan", "jumprelu", nan_layer=2)
    write_clt(tmp / "cltwide", "relu", d=16)
    write_gemma_scope(tmp / "gsmixed", 1, widths={1: F + 4})
    return [
        (tmp / "wide", "layer 0 reads d_model=16 but the run's model has 32"),
        (tmp / "short", "is a circuit-tracer set of 3 layers but the run's model has 4"),
        (tmp / "resid", "feature_input_hook 'hook_resid_mid' (the residual stream before the MLP's norm)"),
        (tmp / "mixed", "a transcoder set has one width, but these layers differ"),
        (tmp / "clt3", "is a cross-layer transcoder over 3 layers but the run's model has 4"),
        (tmp / "cltnan", "W_dec_2 holds 1 NaN or infinite value(s)"),
        (tmp / "cltwide", "reads d_model=16 but the run's model has 32"),
        (tmp / "gsmixed", "a transcoder set has one width, but these layers differ (layer 0: 24, layer 1: 28"),
    ]


def test_sets_that_do_not_fit_the_run_are_one_line_and_write_nothing(run_copy, tmp_path, capsys):
    for source, message in _bad_sources(tmp_path / "bad"):
        line = refused(capsys, [run_copy], "import-sae", source, "--run", run_copy, "--name", "bad")
        assert message in line, (source.name, line)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("hf://someone/some-transcoders/sub", "is on the Hugging Face Hub but HF_HUB_OFFLINE is set"),
        ("hf://someone", "'hf://someone' is not a Hub path: write hf://owner/repo or hf://owner/repo/folder"),
    ],
)
def test_a_hub_path_offline_or_malformed_is_one_line(run_copy, capsys, spec, message):
    line = refused(capsys, [run_copy], "import-sae", spec, "--run", run_copy, "--name", "hub")
    assert message in line


def test_a_sparsify_cross_layer_coder_is_refused(run_copy, tmp_path, capsys):
    folder = tmp_path / "sp" / "layers.0.mlp"
    folder.mkdir(parents=True)
    save_file({"encoder.weight": _f32(np.zeros((F, D)))}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": D, "k": K, "transcode": True, "n_targets": 4}))
    line = refused(capsys, [run_copy], "import-sae", tmp_path / "sp", "--run", run_copy)
    assert "is a sparsify cross-layer coder (n_targets 4): not supported yet" in line


# ---- saescope's own layouts as sources ----------------------------------------------------------


def test_saelens_transcoder_folders_import_by_their_cfg(run_copy, tmp_path, capsys):
    """saescope's per-layer folders are SAELens transcoders (cfg.json names the hooks and layer): they import as is."""
    layers = write_circuit_tracer_set(tmp_path / "ct", "jumprelu", skip=True)
    assert main(["import-sae", str(tmp_path / "ct"), "--run", str(run_copy), "--name", "ct"]) == 0
    source = tmp_path / "saelens"
    shutil.copytree(set_dir(run_copy, "ct"), source)
    (source / "set.json").unlink()
    assert main(["import-sae", str(source), "--run", str(run_copy), "--name", "again"]) == 0
    tcs, _, _ = _imported(run_copy, "again")
    assert read_set(set_dir(run_copy, "again"))["source_format"] == "saelens"
    x = _x(11)
    for i, t in enumerate(layers):
        got = tcs[i].reconstruct(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, circuit_tracer_by_hand(t, x, "jumprelu"), rtol=1e-5, atol=1e-5)
    cfg_path = source / "layer-02" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["meta"]["hook_name"] = "blocks.2.hook_resid_post"
    cfg_path.write_text(json.dumps(cfg))
    line = refused(capsys, [run_copy], "import-sae", source, "--run", run_copy, "--name", "bad")
    assert "hook_name 'blocks.2.hook_resid_post' is not blocks.L.ln2.hook_normalized" in line


def test_a_topk_clt_with_a_skip_path_is_stored_and_traced(run_copy, capsys):
    """A saescope CLT (TopK, skip) in circuit-tracer's layout plus saescope's two fields: read back, then traced."""
    from jobs.import_transcoders import ImportedSet, write_imported
    from pipeline.sae.cross_layer import CltConfig, CrossLayerTranscoder
    from storage.shards import activations_dir, read_manifest

    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CltConfig(L, D, F, "topk", k=K, skip=True)).initialize(torch.Generator().manual_seed(1))
    with torch.no_grad():
        for W_skip in clt.W_skip:
            W_skip.copy_(torch.randn(D, D) * 0.002)
        clt.b_enc_LF.normal_(0, 0.1)
    manifest = read_manifest(activations_dir(run_copy))
    write_imported(run_copy, "mine", ImportedSet({}, clt, "saescope"), "test", manifest)
    folder = set_dir(run_copy, "mine")
    config = (folder / "config.yaml").read_text()
    assert 'model_kind: "cross_layer_transcoder"' in config and 'activation: "topk"' in config and "k: 5" in config
    assert load_file(folder / "W_enc_1.safetensors")["W_skip_1"].shape == (D, D)
    _, _, again = _imported(run_copy, "mine")
    x_LND = torch.randn(L, 7, D)
    torch.testing.assert_close(again.reconstruct(x_LND), clt.eval().reconstruct(x_LND), rtol=1e-6, atol=1e-6)
    doc = _trace(run_copy, "mine", capsys)
    assert doc["saescope"]["logit_error"] < 1e-6


def test_export_writes_a_cross_layer_set_in_circuit_tracers_layout(run_copy, tmp_path, capsys):
    layers = write_clt(tmp_path / "clt", "jumprelu")
    assert main(["import-sae", str(tmp_path / "clt"), "--run", str(run_copy), "--name", "clt"]) == 0
    assert (
        main(["export-transcoders", "--run", str(run_copy), "--transcoders", "clt", "--out", str(tmp_path / "o")]) == 0
    )
    assert "load_clt(" in capsys.readouterr().out
    for i, t in enumerate(layers):
        stored = {
            **load_file(tmp_path / "o" / f"W_enc_{i}.safetensors"),
            **load_file(tmp_path / "o" / f"W_dec_{i}.safetensors"),
        }
        assert set(stored) == set(t) and all(np.allclose(stored[k], v, atol=1e-7) for k, v in t.items())
    assert 'model_kind: "cross_layer_transcoder"' in (tmp_path / "o" / "config.yaml").read_text()


# ---- train --transcoder --cross-layer ------------------------------------------------------------


def test_train_cross_layer_writes_a_set_that_traces(run_copy, capsys):
    args = ["train", "--run", str(run_copy), "--transcoder", "--cross-layer", "--name", "clt", "--d-sae", "48",
            "--k", "4", "--tokens", str(256 * 6), "--batch-size", "256", "--device", "cpu",
            "--dtype", "float32"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "trained a cross-layer transcoder over 4 layers (d_sae 48 per layer)" in out
    folder = set_dir(run_copy, "clt")
    record = read_set(folder)
    assert record["kind"] == "cross_layer" and record["training"]["steps"] == 6
    assert 0 < record["metrics"]["fvu"] < 2 and set(record["metrics"]["layers"]) == {"0", "1", "2", "3"}
    _, _, clt = _imported(run_copy, "clt")
    assert clt.cfg.architecture == "topk" and clt.cfg.k == 4 and clt.cfg.skip and clt.cfg.d_sae == 48
    doc = _trace(run_copy, "clt", capsys)
    assert doc["saescope"]["logit_error"] < 1e-3
    capsys.readouterr()
    line = refused(capsys, [run_copy], *args)
    assert "already has a transcoder set named 'clt': pass --name or --force" in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--transcoder", "--cross-layer", "--arch", "relu"], "--arch 'relu': a cross-layer transcoder trains as"),
        (["--transcoder", "--cross-layer", "--layers", "1-2"], "a cross-layer transcoder spans every layer"),
        (["--cross-layer"], "--cross-layer applies to --transcoder only"),
    ],
)
def test_bad_cross_layer_options_are_one_line(run_copy, capsys, extra, message):
    line = refused(capsys, [run_copy], "train", "--run", run_copy, "--device", "cpu", *extra)
    assert message in line


def test_a_killed_cross_layer_run_resumes_to_the_same_weights(run_copy, tiny_run, tmp_path, monkeypatch, capsys):
    import jobs.training.cross_layer as job

    args = ["train", "--transcoder", "--cross-layer", "--name", "clt", "--d-sae", "32", "--k", "4",
            "--tokens", str(256 * 6), "--batch-size", "256", "--device", "cpu", "--dtype", "float32",
            "--checkpoint-every", "2", "--lm-eval-contexts", "0"]  # fmt: skip
    whole = tmp_path / "whole"
    shutil.copytree(tiny_run, whole)
    assert main([*args, "--run", str(whole)]) == 0
    saved = job.save_checkpoint

    def killed_after_step_4(folder, step, tree):
        saved(folder, step, tree)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(job, "save_checkpoint", killed_after_step_4)
    assert main([*args, "--run", str(run_copy)]) == 130  # Ctrl-C after the checkpoint of step 4
    assert not (set_dir(run_copy, "clt") / "set.json").exists()
    monkeypatch.setattr(job, "save_checkpoint", saved)
    assert main([*args, "--run", str(run_copy)]) == 0
    assert "resuming the cross-layer transcoder 'clt' from its checkpoint at step 4 of 6" in capsys.readouterr().out
    assert read_set(set_dir(run_copy, "clt"))["training"]["resumed_from"] == 4
    assert not job.checkpoints_dir(run_copy, "clt").exists()
    for i in range(L):
        for file in (f"W_enc_{i}.safetensors", f"W_dec_{i}.safetensors"):
            a, b = load_file(set_dir(whole, "clt") / file), load_file(set_dir(run_copy, "clt") / file)
            assert all(np.array_equal(a[k], b[k]) for k in a), file


def test_the_trace_estimate_counts_a_clts_decoders_into_every_later_layer():
    from pipeline.tracing.estimate import GraphShape, estimate

    shape = dict(n_tokens=3, n_layers=4, d_model=8, vocab=10, d_sae=16, active_per_token=2, n_params=1000)
    plain, clt = estimate(GraphShape(**shape)).stages, estimate(GraphShape(**shape, decoder_outputs=2.5)).stages
    assert plain["weights"] == 1000 + 4 * (2 * 16 * 8 + 64 + 32 + 8)
    assert clt["weights"] - plain["weights"] == 4 * 1.5 * 16 * 8  # the decoders into the later layers
    assert clt["prompt"] - plain["prompt"] == (4 * 3 * 2) * 1.5 * 8  # each active feature's writes
    with pytest.raises(ValueError, match="decoder_outputs must be in"):
        GraphShape(**shape, decoder_outputs=5)
