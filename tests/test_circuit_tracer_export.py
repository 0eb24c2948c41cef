"""export-transcoders: the tiny run's transcoder set in circuit-tracer's layout, read back and recomputed by hand."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from jobs.cli import main
from pipeline.sae.circuit_tracer_format import transcoder_from_circuit_tracer
from pipeline.sae.transcoder_format import transcoder_from_saelens
from storage.transcoder_store import load_layer_files, set_dir


@pytest.fixture(scope="module")
def exported(transcoder_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct") / "tc-ct"
    assert main(["export-transcoders", "--run", str(transcoder_run), "--out", str(out)]) == 0
    return transcoder_run, out


def originals(run) -> dict:
    folder = set_dir(run, "tc")
    return {layer: transcoder_from_saelens(*load_layer_files(folder, layer)) for layer in range(4)}


def by_hand(tensors: dict, config: dict, x_ND: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's formulas: pre = x W_enc^T + b_enc, its activation, f W_dec + b_dec + x W_skip^T."""
    pre = x_ND @ tensors["W_enc"].T + tensors["b_enc"]
    if config.get("activation") == "topk":
        gate = torch.zeros_like(pre).scatter(-1, pre.topk(config["k"], dim=-1).indices, 1.0)
        acts = pre * gate
    elif "activation_function.threshold" in tensors:
        acts = pre * (pre > tensors["activation_function.threshold"])
    else:
        acts = torch.relu(pre)
    out = acts @ tensors["W_dec"] + tensors["b_dec"]
    return out + x_ND @ tensors["W_skip"].T if "W_skip" in tensors else out


def test_config_and_files_have_circuit_tracers_names_and_shapes(exported):
    run, out = exported
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "hook_mlp_out")
    assert config["activation"] == "topk" and config["k"] == 4
    assert config["transcoders"] == [str((out / f"layer_{i}.safetensors").resolve()) for i in range(4)]
    tensors = load_file(out / "layer_2.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "W_enc": (64, 32), "b_enc": (64,), "W_dec": (64, 32), "b_dec": (32,), "W_skip": (32, 32)
    }  # fmt: skip


def test_exported_layers_compute_what_the_set_computes(exported):
    run, out = exported
    config = yaml.safe_load((out / "config.yaml").read_text())
    x_ND = torch.randn(50, 32, generator=torch.Generator().manual_seed(0)) * 3
    for layer, original in originals(run).items():
        tensors = load_file(out / f"layer_{layer}.safetensors")
        expected = original.reconstruct(x_ND)
        torch.testing.assert_close(transcoder_from_circuit_tracer(tensors, config).reconstruct(x_ND), expected)
        pre = x_ND @ tensors["W_enc"].T + tensors["b_enc"]
        positive = (pre.topk(4, dim=-1).values > 0).all(dim=1)  # where TopK's kept values are all positive,
        assert positive.sum() > 10  # circuit-tracer's TopK (no ReLU after it) agrees with saescope's
        torch.testing.assert_close(by_hand(tensors, config, x_ND)[positive], expected[positive], rtol=1e-5, atol=1e-5)


def test_a_jumprelu_layer_round_trips_with_its_thresholds():
    from pipeline.sae.circuit_tracer_format import circuit_tracer_config, circuit_tracer_tensors
    from pipeline.sae.model import SaeConfig
    from pipeline.sae.transcoder import Transcoder

    generator = torch.Generator().manual_seed(3)
    tc = Transcoder(SaeConfig(8, 16, "jumprelu", 4)).initialize(generator)
    with torch.no_grad():
        tc.W_skip.normal_(generator=generator)
        tc.log_threshold.uniform_(-2.0, 0.0, generator=generator)
    tensors = circuit_tracer_tensors(tc)
    config = circuit_tracer_config({0: tc}, "m", "m/s", ["layer_0.safetensors"])
    assert "activation" not in config and "activation_function.threshold" in tensors
    x_ND = torch.randn(40, 8, generator=generator)
    torch.testing.assert_close(by_hand(tensors, config, x_ND), tc.reconstruct(x_ND), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(transcoder_from_circuit_tracer(tensors, config).reconstruct(x_ND), tc.reconstruct(x_ND))


def test_circuit_tracer_itself_loads_a_jumprelu_export_when_installed(tiny_run, tmp_path):
    """A BatchTopK set exports as JumpReLU, which every circuit-tracer release reads from the thresholds."""
    hf_utils = pytest.importorskip("circuit_tracer.utils.hf_utils")
    from conftest import tiny_train_config

    from jobs.training.transcoders import run_transcoders

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = tiny_train_config(run, transcoder=True, layers="all", name="btk", arch="batchtopk", tokens=256 * 4)
    run_transcoders(cfg, say=lambda _: None)
    out = tmp_path / "out"
    assert main(["export-transcoders", "--run", str(run), "--out", str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    loaded = hf_utils.load_transcoders(config, device=torch.device("cpu"), lazy_decoder=False)
    x_ND = torch.randn(20, 32, generator=torch.Generator().manual_seed(1)) * 3
    folder = set_dir(run, "btk")
    for layer in range(4):
        ours = transcoder_from_saelens(*load_layer_files(folder, layer))
        torch.testing.assert_close(loaded[layer](x_ND), ours.reconstruct(x_ND), rtol=1e-5, atol=1e-5)


def test_bad_exports_are_one_line_and_write_nothing(transcoder_run, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["export-transcoders", "--run", str(transcoder_run), "--out", str(full)]) == 2
    assert "already holds files" in capsys.readouterr().err and sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    run = tmp_path / "run"
    shutil.copytree(transcoder_run, run)
    record = json.loads((set_dir(run, "tc") / "set.json").read_text())
    (set_dir(run, "tc") / "set.json").write_text(json.dumps({**record, "layers": [1, 2, 3]}))
    out = tmp_path / "out"
    assert main(["export-transcoders", "--run", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a transcoder at every layer from 0" in err and "\n" not in err and not out.exists()


def test_the_offline_models_export_under_their_hub_ids():
    from jobs.export_transcoders import hub_model_name

    assert hub_model_name("default", "SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_model_name("gemma3-270m", "gemma-3-270m-q4_k_m") == "google/gemma-3-270m"
    assert hub_model_name("Qwen/Qwen3-0.6B", "Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert hub_model_name("/no/such/model.gguf", "model") == "model"
