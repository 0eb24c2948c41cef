"""`saescope import-sae` of sparsify folders: transcoders become a set, an SAE becomes an SAE; outputs by hand."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from jobs.cli import main
from jobs.run import read_sae
from pipeline.sae.transcoder_format import transcoder_from_saelens
from storage.sae_store import sae_dir
from storage.transcoder_store import load_layer_files, read_set, set_dir

D, F, K = 32, 16, 4


def write_coder(folder, seed: int, transcode: bool, skip: bool) -> dict:
    torch.manual_seed(seed)
    tensors = {
        "encoder.weight": torch.randn(F, D),
        "encoder.bias": torch.randn(F) * 0.1,
        "W_dec": torch.randn(F, D),
        "b_dec": torch.randn(D) * 0.1,
    }
    if skip:
        tensors["W_skip"] = torch.randn(D, D) * 0.1
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": 1, "normalize_decoder": True, "num_latents": F, "k": K,
           "multi_topk": False, "skip_connection": skip, "transcode": transcode, "d_in": D}  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return tensors


def by_hand(t: dict, x: torch.Tensor, transcode: bool) -> torch.Tensor:
    pre = torch.relu((x if transcode else x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(K, dim=1)
    out = torch.zeros_like(pre).scatter(1, idx, vals) @ t["W_dec"] + t["b_dec"]
    return out + x @ t["W_skip"].T if "W_skip" in t else out


def test_a_folder_of_sparsify_transcoders_becomes_a_set(run_copy, tmp_path, capsys):
    source = tmp_path / "skip-transcoders"
    written = {layer: write_coder(source / f"layers.{layer}.mlp", layer, True, True) for layer in (0, 1)}
    assert main(["import-sae", str(source), "--run", str(run_copy)]) == 0
    folder = set_dir(run_copy, "skip-transcoders")
    assert read_set(folder)["layers"] == [0, 1]
    x = torch.randn(5, D)
    for layer, tensors in written.items():
        tc = transcoder_from_saelens(*load_layer_files(folder, layer))
        torch.testing.assert_close(tc.reconstruct(x), by_hand(tensors, x, True), rtol=1e-4, atol=1e-4)
    assert "imported 2 sparsify transcoders" in capsys.readouterr().out


def test_a_sparsify_sae_of_the_cached_layer_becomes_an_sae(run_copy, tmp_path):
    tensors = write_coder(tmp_path / "layers.2", 7, False, False)
    assert main(["import-sae", str(tmp_path / "layers.2"), "--run", str(run_copy), "--name", "sp"]) == 0
    sae, cfg = read_sae(sae_dir(run_copy, "sp"))
    x = torch.randn(6, D)
    torch.testing.assert_close(sae.reconstruct(x), by_hand(tensors, x, False), rtol=1e-4, atol=1e-4)
    assert cfg["saescope"]["source_format"] == "sparsify"


@pytest.mark.parametrize(
    ("folder", "transcode", "message"),
    [
        ("layers.1", False, "trained on layer 1 but the cache holds layer 2"),
        ("layers.2.attn", True, "is not supported here: expected layers.L.mlp"),
        ("layers.9.mlp", True, "transcoders for layer 9 but the model has 4 layers"),
    ],
)
def test_mismatched_sparsify_folders_are_one_line(run_copy, tmp_path, capsys, folder, transcode, message):
    write_coder(tmp_path / folder, 0, transcode, transcode)
    assert main(["import-sae", str(tmp_path / folder), "--run", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_sparsify_residual_sae_is_refused_by_a_cache_of_another_hook(run_copy, tmp_path, capsys):
    from storage.shards import read_manifest, write_manifest

    folder = run_copy / "activations"
    manifest = read_manifest(folder)
    hook = {"layer": 2, "name": "blocks.2.hook_mlp_out", "kind": "mlp-out"}
    write_manifest(
        folder, type(manifest).from_dict({**manifest.to_dict(), "provenance": {**manifest.provenance, "hook": hook}})
    )
    write_coder(tmp_path / "layers.2", 0, False, False)
    assert main(["import-sae", str(tmp_path / "layers.2"), "--run", str(run_copy)]) == 2
    assert "reads blocks.2.hook_resid_post but the cache holds blocks.2.hook_mlp_out" in capsys.readouterr().err
