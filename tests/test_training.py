"""The trainer: schedules, planted-feature recovery, AuxK, and exact resume."""

import pytest
import torch

from pipeline.sae.initialization import geometric_median, normalization_factor
from pipeline.sae.model import Sae, SaeConfig
from pipeline.sae.optimizers import eval_weights
from pipeline.sae.schedule import default_lr, lr_at
from pipeline.sae.training import (
    TrainConfig,
    TrainState,
    make_optimizer,
    restore_state_tree,
    state_tree,
    train_sae,
    train_step,
)


def test_lr_schedule_by_hand():
    values = [lr_at(s, total_steps=10, base_lr=1.0, warmup_steps=2, decay_fraction=0.2) for s in range(10)]
    assert values == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    assert default_lr(2**14) == pytest.approx(2e-4)
    assert default_lr(4 * 2**14) == pytest.approx(1e-4)


def test_geometric_median_resists_an_outlier_and_normalization_targets_sqrt_d():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1000.0, 1000.0]])
    median = geometric_median(points)
    assert median.norm() < 2.0 < points.mean(0).norm()
    x = torch.randn(100, 16) * 7
    assert (x * normalization_factor(x)).norm(dim=1).mean().item() == pytest.approx(4.0, rel=1e-5)


def planted_data(n_tokens, d=16, n_features=24, k_true=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    active = torch.rand(n_tokens, n_features, generator=g).argsort(dim=1)[:, :k_true]
    coefs = torch.zeros(n_tokens, n_features)
    coefs.scatter_(1, active, 1.0 + torch.rand(n_tokens, k_true, generator=g))
    return coefs @ features, features


def train_on_planted(device: str = "cpu", compute_dtype: torch.dtype = torch.float32) -> tuple[float, list[float]]:
    """(share of planted features some decoder row finds at cosine > 0.9, FVU per step) of a 300-step run."""
    x, features = planted_data(16384)
    x, features = x.to(device), features.to(device)
    torch.manual_seed(0)
    sae = Sae(SaeConfig(d_in=16, d_sae=48, k=3)).initialize(torch.Generator().manual_seed(0)).to(device)
    cfg = TrainConfig(
        total_steps=300, lr=1e-2, warmup_steps=10, auxk_dead_tokens=2048, log_every=1, compute_dtype=compute_dtype
    )
    history = []
    batches = (x[(i * 256) % 16384 : (i * 256) % 16384 + 256] for i in range(10**6))
    train_sae(sae, batches, cfg, on_log=lambda stats, _: history.append(stats.fvu))
    cosines = (features @ sae.W_dec.detach().T).max(dim=1).values
    return (cosines > 0.9).float().mean().item(), history


def test_training_recovers_planted_features_and_fvu_falls():
    recovered, history = train_on_planted()
    assert recovered >= 0.8
    assert history[-1] < 0.2 * history[0]


def test_auxk_moves_dead_latents_only_when_enabled():
    x, _ = planted_data(512)
    results = {}
    for coef in (0.0, 1.0):
        sae = Sae(SaeConfig(d_in=16, d_sae=32, k=2)).initialize(torch.Generator().manual_seed(3))
        cfg = TrainConfig(total_steps=1, lr=1e-2, auxk_coef=coef, auxk_dead_tokens=1)
        state = TrainState.fresh(32)
        state.tokens_since_fired_F[:] = 10  # every latent counts as dead
        before = sae.W_enc_FD.detach().clone()
        out = sae(x)
        unused = torch.ones(32, dtype=torch.bool)
        unused[out.idx_NK.flatten()] = False
        train_step(sae, make_optimizer(sae, cfg), x, state, cfg)
        moved = (sae.W_enc_FD.detach() - before).abs().sum(1) > 0
        results[coef] = (moved & unused).any().item()
    assert results == {0.0: False, 1.0: True}


def test_dense_and_sparse_auxk_paths_agree(monkeypatch):
    import pipeline.sae.auxk as auxk

    x, _ = planted_data(256)
    grads = []
    for limit in (10**6, 0):  # dense path, then forced sparse path
        monkeypatch.setattr(auxk, "DENSE_AUX_MAX_DEAD", limit)
        sae = Sae(SaeConfig(d_in=16, d_sae=40, k=3)).initialize(torch.Generator().manual_seed(5), encoder_scale=0.5)
        dead = torch.zeros(40, dtype=torch.bool)
        dead[::3] = True  # 14 dead latents, more than k_aux = 8
        loss = auxk.auxk_loss(sae, x, sae(x), dead)
        loss.backward()
        grads.append((loss.detach(), sae.W_enc_FD.grad.clone(), sae.W_dec.grad.clone(), sae.b_enc.grad.clone()))
    for dense, sparse in zip(*grads, strict=True):
        torch.testing.assert_close(dense, sparse, rtol=1e-4, atol=1e-5)
    assert grads[0][0] > 0


@pytest.mark.parametrize("optimizer", ["signum-sf", "adam"])
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu", "matryoshka"])
def test_resume_equals_uninterrupted(arch, optimizer):
    x, _ = planted_data(4096, seed=1)
    batches = [x[i * 256 : (i + 1) * 256] for i in range(16)]
    cfg = TrainConfig(
        total_steps=16, lr=5e-3, optimizer=optimizer, warmup_steps=2, auxk_dead_tokens=512, l1_warmup_steps=3
    )

    def fresh():
        return Sae(SaeConfig(d_in=16, d_sae=32, architecture=arch, k=3)).initialize(torch.Generator().manual_seed(7))

    whole = fresh()
    whole_optimizer = make_optimizer(whole, cfg)
    train_sae(whole, iter(batches), cfg, optimizer=whole_optimizer)

    first = fresh()
    optimizer = make_optimizer(first, cfg)
    state = train_sae(first, iter(batches[:9]), cfg, optimizer=optimizer).state
    tree = state_tree(first, optimizer, state)
    resumed = fresh()
    resumed_optimizer = make_optimizer(resumed, cfg)
    resumed_state = restore_state_tree(tree, resumed, resumed_optimizer)
    train_sae(resumed, iter(batches[9:]), cfg, resumed_state, resumed_optimizer)
    for name, param in whole.state_dict().items():
        assert torch.equal(param, resumed.state_dict()[name]), name
    with eval_weights(whole, whole_optimizer), eval_weights(resumed, resumed_optimizer):  # what is exported
        for name, param in whole.state_dict().items():
            assert torch.equal(param, resumed.state_dict()[name]), f"eval {name}"


def test_bad_train_config_is_a_clear_error():
    with pytest.raises(ValueError, match="learning rate must be positive"):
        TrainConfig(total_steps=10, lr=-1.0)
    with pytest.raises(ValueError, match="total_steps must be at least 1"):
        TrainConfig(total_steps=0, lr=1e-3)
