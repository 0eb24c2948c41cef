"""`saescope train`, `eval` and `import-sae` on a tiny model's cache."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import pipeline.sae.training as training
from jobs.cli import main
from jobs.options import ConfigError
from jobs.run import read_sae
from jobs.train import run_train
from storage.sae_store import SaeStoreError


def _cfg(run, **overrides):
    from conftest import tiny_train_config

    return tiny_train_config(run, **{"lm_eval_contexts": 4, **overrides})


def crash_training_at(monkeypatch, step: int):
    """Make the next training run raise KeyboardInterrupt when it reaches ``step``; returns an undo."""
    real_step = training.train_step

    def crashing(sae, optimizer, x, state, cfg, *rest):
        if state.step == step:
            raise KeyboardInterrupt
        return real_step(sae, optimizer, x, state, cfg, *rest)

    monkeypatch.setattr(training, "train_step", crashing)
    return lambda: monkeypatch.setattr(training, "train_step", real_step)


def test_train_writes_a_saelens_layout_sae_with_metrics(run_copy):
    summary = run_train(_cfg(run_copy))
    folder = run_copy / "saes" / "default"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and (cfg["d_in"], cfg["d_sae"]) == (32, 64)
    assert cfg["meta"]["hook_name"] == "blocks.2.hook_resid_post" and cfg["meta"]["hook_layer"] == 2
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    weights = load_file(folder / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (32, 64),
        "b_enc": (64,),
        "W_dec": (64, 32),
        "b_dec": (32,),
    }
    metrics = summary.metrics
    for key in ("fvu", "pca_fvu", "l0", "dead_fraction", "ce_loss_recovered", "delta_lm_loss", "kl_spliced"):
        assert math.isfinite(metrics[key]), key
    assert 0 < metrics["fvu"] < 1 and metrics["l0"] <= 4
    assert metrics["dead_window_tokens"] == 256 * 24
    assert not (folder / "checkpoints").exists()
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 24
    assert "[train.default]" in (run_copy / "run.toml").read_text()


def test_saved_sae_takes_raw_activations(run_copy):
    run_train(_cfg(run_copy))
    sae, cfg = read_sae(run_copy / "saes" / "default")
    from storage.shards import iter_shards, read_manifest

    manifest = read_manifest(run_copy / "activations")
    shard = next(iter_shards(run_copy / "activations", manifest))
    x = shard.activations_CTD[:, 1:].reshape(-1, 32).float()
    fvu = ((x - sae.reconstruct(x)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu < 1.0  # a scale mismatch would blow this up
    assert cfg["saescope"]["normalization"]["folded"] is True


def test_finished_sae_is_not_retrained_unless_forced(run_copy):
    run_train(_cfg(run_copy))
    assert run_train(_cfg(run_copy)).already_done
    assert not run_train(_cfg(run_copy, force=True)).already_done


def test_killed_training_resumes_to_identical_weights(run_copy, tmp_path, monkeypatch):
    import shutil

    other = tmp_path / "whole"
    shutil.copytree(run_copy, other)
    run_train(_cfg(other))
    undo = crash_training_at(monkeypatch, 13)
    with pytest.raises(KeyboardInterrupt):
        run_train(_cfg(run_copy))
    assert (run_copy / "saes" / "default" / "checkpoints" / "step-000000010").is_dir()
    undo()
    summary = run_train(_cfg(run_copy))
    assert summary.resumed_from == 10
    resumed = load_file(run_copy / "saes" / "default" / "sae_weights.safetensors")
    whole = load_file(other / "saes" / "default" / "sae_weights.safetensors")
    for name in whole:
        assert torch.equal(resumed[name], whole[name]), name


def test_resume_with_other_options_is_refused(run_copy, monkeypatch):
    undo = crash_training_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        run_train(_cfg(run_copy))
    undo()
    with pytest.raises(ConfigError, match="lr: checkpoint .* now 0.5"):
        run_train(_cfg(run_copy, lr=0.5))


@pytest.mark.parametrize("arch", ["batchtopk", "relu", "jumprelu"])
def test_other_architectures_train_and_export(run_copy, arch):
    summary = run_train(_cfg(run_copy, arch=arch, lm_eval_contexts=0))
    cfg = json.loads((run_copy / "saes" / "default" / "cfg.json").read_text())
    assert cfg["architecture"] == ("jumprelu" if arch == "batchtopk" else arch)
    assert cfg["saescope"]["trained_architecture"] == arch
    assert math.isfinite(summary.metrics["fvu"])
    if arch == "batchtopk":
        weights = load_file(run_copy / "saes" / "default" / "sae_weights.safetensors")
        assert weights["threshold"].shape == (64,) and (weights["threshold"] > 0).all()


def test_bad_hyperparameters_fail_before_any_work(run_copy):
    with pytest.raises(ConfigError, match=r"--k \(64\) must be smaller than --d-sae \(64\)"):
        run_train(_cfg(run_copy, k=64))
    with pytest.raises(ConfigError, match=r"--k \(32\) must be smaller than d_sae \(32\)"):
        run_train(_cfg(run_copy, d_sae=None, expansion=1, k=32))
    with pytest.raises(ConfigError, match="--lr must be positive"):
        _cfg(run_copy, lr=-1e-3)
    assert not (run_copy / "saes").exists()


def test_lr_must_be_auto_or_a_number(run_copy, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--run", str(run_copy), "--lr", "fast"])
    assert "expected 'auto' or a float, got 'fast'" in capsys.readouterr().err


def test_optimizer_option_round_trips_through_the_cli_and_config(run_copy, capsys):
    import argparse

    from jobs.options import config_from_args, config_from_mapping, config_to_mapping
    from jobs.train import register
    from jobs.training.config import TrainJobConfig, trainer_config

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train", "--run", str(run_copy), "--optimizer", "adam"])
    cfg = config_from_args(TrainJobConfig, args)
    assert cfg.optimizer == "adam"
    saved = {key: value for key, value in config_to_mapping(cfg).items() if value is not None}  # as run.toml holds it
    assert config_from_mapping(TrainJobConfig, saved, "run.toml").optimizer == "adam"
    assert TrainJobConfig(run=str(run_copy)).optimizer == "auto"
    resolved = dataclasses.replace(cfg, tokens=4096, lr=1e-3, warmup_steps=0, checkpoint_every=10)
    assert trainer_config(resolved, torch.float32).optimizer == "adam"
    with pytest.raises(SystemExit):
        main(["train", "--run", str(run_copy), "--optimizer", "sgd"])
    assert "invalid choice: 'sgd'" in capsys.readouterr().err


def test_auto_optimizer_is_signum_sf_for_short_runs_and_adam_for_long_ones():
    from jobs.training.config import auto_optimizer

    assert auto_optimizer("auto", 1.0) == "signum-sf"
    assert auto_optimizer("auto", 10.0) == "adam"
    assert auto_optimizer("signum-sf", 10.0) == "signum-sf" and auto_optimizer("adam", 0.5) == "adam"


def test_unknown_architecture_on_the_cli(run_copy, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--run", str(run_copy), "--arch", "gated"])
    assert "invalid choice: 'gated'" in capsys.readouterr().err


def test_eval_cli_prints_json_metrics(run_copy, capsys):
    run_train(_cfg(run_copy, lm_eval_contexts=0))
    capsys.readouterr()
    assert main(["eval", "--run", str(run_copy), "--json", "--lm-eval-contexts", "2"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 < metrics["fvu"] < 1 and "ce_loss_recovered" in metrics


def _saelens_standard_folder(path, d_in=32, d_sae=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "W_enc": torch.randn(d_in, d_sae, generator=g),
        "b_enc": torch.randn(d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_dec": torch.randn(d_in, generator=g),
    }
    path.mkdir(parents=True)
    save_file(tensors, path / "sae_weights.safetensors")
    cfg = {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "meta": {"hook_name": "blocks.2.hook_resid_post"},
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
    return tensors


def test_import_saelens_sae_keeps_its_function(run_copy, tmp_path):
    tensors = _saelens_standard_folder(tmp_path / "external")
    assert main(["import-sae", str(tmp_path / "external"), "--run", str(run_copy), "--name", "ext"]) == 0
    sae, _ = read_sae(run_copy / "saes" / "ext")
    x = torch.randn(10, 32)
    expected = torch.relu(x @ tensors["W_enc"] + tensors["b_enc"]) @ tensors["W_dec"] + tensors["b_dec"]
    torch.testing.assert_close(sae.reconstruct(x), expected, rtol=1e-4, atol=1e-4)


def test_import_refuses_a_mismatched_sae(run_copy, tmp_path):
    _saelens_standard_folder(tmp_path / "wide", d_in=48)
    assert main(["import-sae", str(tmp_path / "wide"), "--run", str(run_copy)]) == 2
    with pytest.raises(SaeStoreError, match="not supported"):
        folder = tmp_path / "gated"
        _saelens_standard_folder(folder)
        cfg = json.loads((folder / "cfg.json").read_text())
        (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
        read_sae(folder)


def test_auto_dtype_is_chosen_once_and_reused_on_resume(run_copy, monkeypatch):
    """ "auto" measured bfloat16 faster at the start; on resume the measurement flips, the run keeps bfloat16."""
    import pipeline.runtime.precision

    monkeypatch.setattr(pipeline.runtime.precision, "measure_speeds", lambda _d: {"float32": 10.0, "bfloat16": 40.0})
    undo = crash_training_at(monkeypatch, 12)
    with pytest.raises(KeyboardInterrupt):
        run_train(_cfg(run_copy, dtype="auto", lm_eval_contexts=0))
    undo()
    monkeypatch.setattr(pipeline.runtime.precision, "measure_speeds", lambda _d: {"float32": 40.0, "bfloat16": 10.0})
    summary = run_train(_cfg(run_copy, dtype="auto", lm_eval_contexts=0))
    assert summary.resumed_from > 0 and summary.config.dtype == "bfloat16"


def test_matryoshka_trains_from_the_cli_saves_its_widths_and_reports_each_prefix(run_copy, capsys):
    args = ["train", "--run", str(run_copy), "--arch", "matryoshka", "--matryoshka-widths", "8,16,64"]
    args += ["--d-sae", "64", "--k", "4", "--tokens", str(256 * 24), "--batch-size", "256"]
    assert main([*args, "--device", "cpu", "--dtype", "float32", "--lm-eval-contexts", "0"]) == 0
    out = capsys.readouterr().out
    assert "matryoshka prefixes (width: held-out FVU, L0 within it): 8: FVU " in out
    folder = run_copy / "saes" / "default"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["matryoshka_widths"]) == ("jumprelu", [8, 16, 64])
    assert cfg["saescope"]["trained_architecture"] == "matryoshka_batchtopk"
    assert cfg["saescope"]["training"]["matryoshka_widths"] == "8,16,64"
    weights = load_file(folder / "sae_weights.safetensors")
    assert weights["threshold"].shape == (64,) and (weights["threshold"] == weights["threshold"][0]).all()
    sae, _ = read_sae(folder)
    assert sae.cfg.prefix_widths == (8, 16, 64)
    prefixes = cfg["saescope"]["metrics"]["matryoshka_prefixes"]
    assert [p["width"] for p in prefixes] == [8, 16, 64]
    assert prefixes[-1]["fvu"] == pytest.approx(cfg["saescope"]["metrics"]["fvu"], rel=1e-6)
    assert prefixes[-1]["l0"] == pytest.approx(cfg["saescope"]["metrics"]["l0"])
    assert prefixes[0]["fvu"] > prefixes[-1]["fvu"] and prefixes[0]["l0"] < prefixes[-1]["l0"]


def test_a_killed_forced_retrain_keeps_the_old_sae_and_resumes(run_copy, monkeypatch):
    run_train(_cfg(run_copy))
    old = load_file(run_copy / "saes" / "default" / "sae_weights.safetensors")
    undo = crash_training_at(monkeypatch, 13)
    with pytest.raises(KeyboardInterrupt):
        run_train(_cfg(run_copy, force=True, seed=1))
    undo()
    kept = load_file(run_copy / "saes" / "default" / "sae_weights.safetensors")
    assert all(torch.equal(kept[name], old[name]) for name in old)  # still the finished SAE
    summary = run_train(_cfg(run_copy, seed=1))  # without --force: the interrupted retrain continues
    assert not summary.already_done and summary.resumed_from == 10
    new = load_file(run_copy / "saes" / "default" / "sae_weights.safetensors")
    assert not torch.equal(new["W_dec"], old["W_dec"])
