"""`saescope train --transcoder`: a set per run, metrics per layer and all at once, exact resume, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_train_config

from jobs.cli import main
from jobs.training.transcoders import run_transcoders
from pipeline.sae.transcoder_format import transcoder_from_saelens
from storage.transcoder_store import load_layer_files, read_set, set_dir


def _config(run, **overrides):
    values = dict(transcoder=True, layers="0,2", name="tc", tokens=256 * 12, lm_eval_contexts=8, checkpoint_every=4)
    return tiny_train_config(run, **{**values, **overrides})


def _weights(run, name="tc", layers=(0, 2)):
    return {layer: load_layer_files(set_dir(run, name), layer)[0] for layer in layers}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_run):
    import shutil

    run = tmp_path_factory.mktemp("tc") / "run"
    shutil.copytree(tiny_run, run)
    summary = run_transcoders(_config(run), say=lambda _: None)
    return run, summary


def test_a_set_holds_each_layer_with_metrics_and_all_layers_replaced(trained):
    run, summary = trained
    record = read_set(set_dir(run, "tc"))
    assert record["layers"] == [0, 2]
    for layer in ("0", "2"):
        m = record["metrics"]["layers"][layer]
        assert 0 < m["fvu"] < 1.0, m
        assert 0 < m["l0"] <= 4
        assert {"ce_loss_recovered", "kl_spliced", "ce_zero"} <= set(m)
    every = record["metrics"]["all_layers"]
    assert every["ce_zero"] != every["ce_clean"] and every["kl_spliced"] >= 0
    tensors, cfg = load_layer_files(set_dir(run, "tc"), 2)
    assert cfg["architecture"] == "topk_skip_transcoder" and cfg["meta"]["hook_name"] == "blocks.2.ln2.hook_normalized"
    assert cfg["meta"]["hook_name_out"] == "blocks.2.hook_mlp_out" and cfg["apply_b_dec_to_input"] is False
    assert set(tensors) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"}
    assert transcoder_from_saelens(tensors, cfg).cfg.k == 4
    assert not (set_dir(run, "tc") / "checkpoints").exists()


def test_loaded_transcoders_reproduce_the_recorded_fvu(trained, tiny_model):
    """Round trip: the saved files, loaded back, give the held-out FVU the job recorded."""
    from jobs.training.transcoder_eval import reconstruction_by_layer
    from jobs.training.transcoders import training_tokens
    from storage.shards import activations_dir, read_manifest
    from storage.training_data import heldout_range

    run, _ = trained
    manifest = read_manifest(activations_dir(run))
    tcs = {layer: transcoder_from_saelens(*load_layer_files(set_dir(run, "tc"), layer)) for layer in (0, 2)}
    first, _ = heldout_range(manifest, read_set(set_dir(run, "tc"))["training"]["heldout_contexts"])
    tokens = training_tokens(activations_dir(run), manifest)[first:]
    again = reconstruction_by_layer(tiny_model, tcs, tokens, manifest.special_token_ids)
    recorded = read_set(set_dir(run, "tc"))["metrics"]["layers"]
    for layer in (0, 2):
        assert again[layer]["fvu"] == pytest.approx(recorded[str(layer)]["fvu"], rel=1e-4)


def test_a_killed_set_resumes_to_the_same_weights(trained, run_copy, monkeypatch):
    import jobs.training.transcoders as job

    real_save = job.save_checkpoint

    def save_then_die(folder, step, tree, **kw):
        real_save(folder, step, tree, **kw)
        if step == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(job, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_transcoders(_config(run_copy), say=lambda _: None)
    monkeypatch.setattr(job, "save_checkpoint", real_save)
    notes = []
    summary = run_transcoders(_config(run_copy), say=notes.append)
    assert summary.resumed_from == 8 and any("resuming" in n for n in notes)
    expected, got = _weights(trained[0]), _weights(run_copy)
    for layer in (0, 2):
        for name, tensor in expected[layer].items():
            assert torch.equal(tensor, got[layer][name]), (layer, name)


def test_a_finished_set_is_left_alone(trained):
    run, _ = trained
    assert run_transcoders(_config(run), say=lambda _: None).already_done


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "7"], "--layers: layer 7 out of range: model has 4 layers (0-3)"),
        (["--arch", "relu"], "--arch 'relu': transcoders are trained as one of topk, batchtopk"),
        (["--k", "8,16"], "--k takes one value with --transcoder"),
    ],
)
def test_bad_options_are_one_line_before_the_model_loads(capsys, run_copy, monkeypatch, args, message):
    import jobs.training.transcoders as job

    monkeypatch.setattr(job, "load_run_model", lambda *_: pytest.fail("the model loaded before the check"))
    code = main(["train", "--run", str(run_copy), "--transcoder", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and "Traceback" not in "\n".join(err)


def test_layers_without_transcoder_is_refused(capsys, run_copy):
    code = main(["train", "--run", str(run_copy), "--layers", "1"])
    assert code == 2 and "--layers applies to --transcoder only" in capsys.readouterr().err


def test_no_skip_without_transcoder_is_refused(capsys, run_copy):
    code = main(["train", "--run", str(run_copy), "--no-skip"])
    assert code == 2 and "--no-skip applies to --transcoder only" in capsys.readouterr().err


def test_a_plain_set_has_no_skip_path_and_traces_complete(run_copy, tiny_model):
    """--no-skip: plain transcoders (no W_skip), saved as such, and a graph through them is complete."""
    from pipeline.tracing.trace import trace

    summary = run_transcoders(_config(run_copy, name="plain", skip=False, layers="all"), say=lambda _: None)
    record = read_set(summary.folder)
    assert record["training"]["skip"] is False and 0 < record["metrics"]["layers"]["1"]["fvu"] < 1.0
    tensors, cfg = load_layer_files(summary.folder, 1)
    assert "W_skip" not in tensors and cfg["architecture"] == "topk_transcoder"
    tcs = {layer: transcoder_from_saelens(*load_layer_files(summary.folder, layer)) for layer in record["layers"]}
    assert all(tc.W_skip is None for tc in tcs.values())
    graph = trace(tiny_model.float(), torch.tensor([0, 5, 6, 7, 8]), tcs, max_feature_nodes=50)
    assert graph.logit_error < 1e-4
