"""The stacked all-layer transcoder step against its eager twin, the per-layer ``train_step``."""

from __future__ import annotations

import pytest
import torch

from pipeline.sae.initialization import init_transcoder
from pipeline.sae.model import SaeConfig
from pipeline.sae.stacked import stack_members, stacked_step, unstack_members
from pipeline.sae.training import TrainConfig, TrainState, make_optimizer, state_tree, train_step

N_LAYERS, D, F_LATENTS, K, N = 3, 8, 48, 2, 12


def _batches(n_steps: int, dtype: torch.dtype):
    """Per step, per layer, an (input, target) pair: target a fixed random MLP of the input."""
    g = torch.Generator().manual_seed(1)
    mlps = [torch.randn(D, D, generator=g, dtype=dtype) for _ in range(N_LAYERS)]
    steps = []
    for _ in range(n_steps):
        pairs = []
        for layer in range(N_LAYERS):
            x = torch.randn(N, D, generator=g, dtype=dtype)
            pairs.append((x, torch.tanh(x @ mlps[layer]) + 0.1))
        steps.append(pairs)
    return steps


def _members(cfg: TrainConfig, dtype: torch.dtype, batch):
    shape = SaeConfig(D, F_LATENTS, "topk", K)
    members = []
    for layer in range(N_LAYERS):
        tc = init_transcoder(shape, batch[layer][1].float(), seed=layer).to(dtype)
        members.append((tc, make_optimizer(tc, cfg), TrainState.fresh(F_LATENTS)))
    return members


def _config(optimizer: str) -> TrainConfig:
    # auxk_dead_tokens of two steps: latents die and AuxK does its work within the test; no autocast (the
    # weights' own dtype, float64 or float32, is the compute dtype)
    return TrainConfig(total_steps=20, lr=3e-3, optimizer=optimizer, warmup_steps=2, auxk_dead_tokens=2 * N)


def _eager(members, batches, cfg):
    stats = []
    for pairs in batches:
        row = zip(members, pairs, strict=True)
        stats.append([train_step(tc, opt, x, st, cfg, target_ND=y) for (tc, opt, st), (x, y) in row])
    return stats


def _stacked(stacked, batches, cfg):
    tcs, opt, state = stacked
    stats = []
    for pairs in batches:
        x_LND = torch.stack([x for x, _ in pairs])
        y_LND = torch.stack([y for _, y in pairs])
        stats.append(stacked_step(tcs, opt, x_LND, y_LND, state, cfg))
    return stats


def _assert_members_equal(got, want, rtol, atol):
    for (tc_a, opt_a, st_a), (tc_b, opt_b, st_b) in zip(got, want, strict=True):
        for name, p in tc_b.named_parameters():
            torch.testing.assert_close(getattr(tc_a, name), p, rtol=rtol, atol=atol, msg=name)
        tree_a, tree_b = state_tree(tc_a, opt_a, st_a), state_tree(tc_b, opt_b, st_b)
        assert tree_a["train"]["step"] == tree_b["train"]["step"]
        assert tree_a["train"]["tokens_seen"] == tree_b["train"]["tokens_seen"]
        assert torch.equal(tree_a["train"]["tokens_since_fired_F"], tree_b["train"]["tokens_since_fired_F"])
        for index, entry in tree_b["optimizer"]["state"].items():
            for key, value in entry.items():
                torch.testing.assert_close(
                    tree_a["optimizer"]["state"][index][key], value, rtol=rtol, atol=atol, msg=key
                )
        groups_a, groups_b = tree_a["optimizer"]["param_groups"], tree_b["optimizer"]["param_groups"]
        assert [(g["lr"], g.get("k")) for g in groups_a] == [(g["lr"], g.get("k")) for g in groups_b]


@pytest.mark.parametrize("optimizer", ["signum-sf", "adam"])
def test_stacked_step_equals_per_layer_steps(optimizer):
    dtype = torch.float64
    batches = _batches(8, dtype)
    cfg = _config(optimizer)
    eager = _members(cfg, dtype, batches[0])
    stacked = stack_members(_members(cfg, dtype, batches[0]), cfg)
    eager_stats = _eager(eager, batches, cfg)
    stacked_stats = _stacked(stacked, batches, cfg)
    assert any(st.aux_loss > 0 for row in eager_stats for st in row), "AuxK never ran: the test would not cover it"
    # AuxK's sum runs in another order than the per-layer path's dense block; Adam divides by sqrt(v) + eps,
    # so on barely-moved latents float64 rounding reaches ~1e-9 after a few steps
    _assert_members_equal(unstack_members(*stacked, cfg), eager, rtol=1e-7, atol=1e-8)
    for want_row, got_row in zip(eager_stats, stacked_stats, strict=True):
        for want, got in zip(want_row, got_row, strict=True):
            assert got.step == want.step
            for field in ("loss", "mse", "fvu", "l0", "aux_loss", "lr"):  # statistics are float32
                assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-6, abs=1e-9), field


def test_float32_stays_close_to_the_per_layer_path():
    dtype = torch.float32
    batches = _batches(4, dtype)
    cfg = _config("adam")
    eager = _members(cfg, dtype, batches[0])
    stacked = stack_members(_members(cfg, dtype, batches[0]), cfg)
    _eager(eager, batches, cfg)
    _stacked(stacked, batches, cfg)
    _assert_members_equal(unstack_members(*stacked, cfg), eager, rtol=1e-4, atol=1e-5)


def test_resume_through_per_layer_checkpoint_gives_the_same_result():
    """Stop after 3 steps, go through per-layer copies (what checkpoints hold), go on: same as never stopping."""
    dtype = torch.float64
    batches = _batches(7, dtype)
    cfg = _config("signum-sf")
    straight = stack_members(_members(cfg, dtype, batches[0]), cfg)
    _stacked(straight, batches, cfg)
    first = stack_members(_members(cfg, dtype, batches[0]), cfg)
    _stacked(first, batches[:3], cfg)
    resumed = stack_members(unstack_members(*first, cfg), cfg)
    _stacked(resumed, batches[3:], cfg)
    _assert_members_equal(unstack_members(*resumed, cfg), unstack_members(*straight, cfg), rtol=0, atol=0)


def test_the_job_trains_the_same_set_on_either_path(run_copy, tmp_path, monkeypatch):
    """``train --transcoder`` on the stacked path (topk, the default) and forced onto the per-layer one."""
    import shutil

    from conftest import tiny_train_config

    import jobs.training.transcoders as job
    from storage.transcoder_store import load_layer_files, set_dir

    def train(run):
        cfg = tiny_train_config(
            run, transcoder=True, layers="0,2", name="tc", tokens=256 * 6, lm_eval_contexts=4, dtype="float32"
        )
        job.run_transcoders(cfg, say=lambda _: None)
        return {layer: load_layer_files(set_dir(run, "tc"), layer)[0] for layer in (0, 2)}

    used = []
    real = job._train_stacked
    monkeypatch.setattr(job, "_train_stacked", lambda *a: used.append(True) or real(*a))
    other = tmp_path / "per-layer"
    shutil.copytree(run_copy, other)
    stacked = train(run_copy)
    assert used, "the default set did not take the stacked path"
    monkeypatch.setattr(job, "_stacks", lambda *_: False)
    per_layer = train(other)
    for layer in (0, 2):
        for name, tensor in per_layer[layer].items():
            torch.testing.assert_close(stacked[layer][name], tensor, rtol=1e-4, atol=1e-5, msg=f"{layer} {name}")
