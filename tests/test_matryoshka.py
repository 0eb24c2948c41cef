"""Matryoshka BatchTopK SAEs: widths, nested reconstructions (sparse = dense twin), loss, export, metrics."""

import dataclasses

import pytest
import torch

from pipeline.evaluation.reconstruction import reconstruction_report
from pipeline.sae.matryoshka import check_widths, default_widths, prefix_decode, prefix_decode_eager, prefix_l0
from pipeline.sae.model import Sae, SaeConfig, export_sae
from pipeline.sae.saelens import sae_cfg_dict, sae_from_saelens, sae_tensors
from pipeline.sae.training import TrainConfig, TrainState, make_optimizer, train_step

X_HAND = torch.tensor([[3.0, 0.0, 2.0, 1.0], [0.0, 1.0, 0.0, 4.0]])
"""Two tokens for the identity SAE: with widths (1, 2, 4) the prefixes see latents {0}, {0, 1}, all."""


def identity_matryoshka(arch="matryoshka", k=3, widths=(1, 2, 4)):
    """d_in = d_sae = 4, W_enc = W_dec = I, biases 0, global threshold 0.5: codes are the coordinates."""
    sae = Sae(SaeConfig(d_in=4, d_sae=4, architecture=arch, k=k, matryoshka_widths=widths))
    with torch.no_grad():
        sae.W_enc_FD.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        if arch == "matryoshka":
            sae.batch_threshold.fill_(0.5)
        else:
            sae.log_threshold.fill_(torch.log(torch.tensor(0.5)).item())
    return sae


def test_default_widths_halve_down_to_a_sixteenth():
    assert default_widths(64) == (4, 8, 16, 32, 64)
    assert default_widths(4608) == (288, 576, 1152, 2304, 4608)
    assert default_widths(8) == (1, 2, 4, 8)
    assert SaeConfig(8, 64, "matryoshka", k=4).prefix_widths == (4, 8, 16, 32, 64)
    assert SaeConfig(8, 64, "batchtopk", k=4).prefix_widths == ()


@pytest.mark.parametrize(
    ("widths", "message"),
    [
        ((), "at least one width"),
        ((0, 8, 64), "positive integers"),
        ((16, 8, 64), "strictly increasing"),
        ((8, 8, 64), "strictly increasing"),
        ((8, 16, 32), "the last width must be d_sae = 64"),
    ],
)
def test_bad_widths_are_a_clear_error(widths, message):
    with pytest.raises(ValueError, match=message):
        check_widths(widths, 64)
    if widths:
        with pytest.raises(ValueError, match=f"matryoshka widths: .*{message}"):
            SaeConfig(8, 64, "matryoshka", k=4, matryoshka_widths=widths)


def test_widths_belong_to_matryoshka_saes_and_their_exports():
    with pytest.raises(ValueError, match="not topk"):
        SaeConfig(8, 64, "topk", k=4, matryoshka_widths=(8, 64))


def test_sparse_prefix_decode_equals_its_dense_twin_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    n, k, f, d, widths = 9, 6, 24, 5, (3, 6, 12, 24)
    idx = torch.stack([torch.randperm(f, generator=gen)[:k] for _ in range(n)])
    acts = torch.rand(n, k, generator=gen) * (torch.rand(n, k, generator=gen) > 0.3)
    W = torch.randn(f, d, generator=gen)
    results = []
    for decode in (prefix_decode, prefix_decode_eager):
        a, w = acts.clone().requires_grad_(), W.clone().requires_grad_()
        out = decode(a, idx, w, widths)
        (out * torch.linspace(-1, 2, d)).pow(2).sum().backward()
        results.append((out.detach(), a.grad, w.grad))
    for sparse, dense in zip(*results, strict=True):
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results[0][0][:, -1], (acts[:, :, None] * W[idx]).sum(1), rtol=1e-5, atol=1e-5)


def test_prefix_reconstructions_and_l0_by_hand():
    sae = identity_matryoshka().train()
    out = sae(X_HAND)
    # BatchTopK with k 3 over 2 tokens keeps the 6 largest positives: all 5 non-zero codes.
    expected = torch.tensor(
        [
            [[3.0, 0, 0, 0], [3.0, 0, 0, 0], [3.0, 0, 2, 1]],
            [[0.0, 0, 0, 0], [0.0, 1, 0, 0], [0.0, 1, 0, 4]],
        ]
    )
    torch.testing.assert_close(out.prefix_x_hat_NMD, expected)
    torch.testing.assert_close(out.x_hat_ND, X_HAND)
    assert prefix_l0(out.acts_NK, out.idx_NK, (1, 2, 4)).tolist() == [[1, 1, 3], [0, 1, 2]]


def test_loss_is_the_sum_of_the_prefix_mses():
    sae = identity_matryoshka()
    cfg = TrainConfig(total_steps=1, lr=1e-9)
    stats = train_step(sae, make_optimizer(sae, cfg), X_HAND, TrainState.fresh(4), cfg)
    # prefix {0}: errors 2^2 + 1^2 and 1^2 + 4^2; prefix {0, 1}: 5 and 16; the whole SAE: 0. Mean over 2 tokens.
    assert stats.mse == pytest.approx(0.0, abs=1e-6)
    assert stats.loss == pytest.approx((5 + 17 + 5 + 16) / 2, rel=1e-5)


def test_export_runs_as_jumprelu_with_the_global_threshold_and_keeps_the_widths():
    sae = identity_matryoshka()
    with torch.no_grad():
        sae.b_dec.copy_(torch.tensor([0.5, 0.0, -0.5, 1.0]))
    exported = export_sae(sae.eval(), input_scale=2.0)
    assert exported.cfg.architecture == "jumprelu" and exported.cfg.matryoshka_widths == (1, 2, 4)
    torch.testing.assert_close(exported.threshold, torch.full((4,), 0.25))
    raw = torch.randn(20, 4) * 3
    torch.testing.assert_close(exported.reconstruct(raw), sae.reconstruct(raw * 2.0) / 2.0, rtol=1e-5, atol=1e-5)


def test_saelens_round_trip_keeps_weights_threshold_and_widths():
    torch.manual_seed(0)
    sae = Sae(SaeConfig(d_in=6, d_sae=16, architecture="matryoshka", k=3)).initialize(torch.Generator().manual_seed(2))
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1)
        sae.b_dec.normal_()
        sae.batch_threshold.fill_(0.3)
    exported = export_sae(sae.eval(), input_scale=1.5)
    cfg = sae_cfg_dict(exported, {"hook_name": "blocks.1.hook_resid_post"}, {})
    assert cfg["architecture"] == "jumprelu" and cfg["matryoshka_widths"] == [1, 2, 4, 8, 16]
    assert (cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"]) == (6, 16, True)
    tensors = sae_tensors(exported)
    assert sorted(tensors) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    loaded = sae_from_saelens(tensors, cfg)
    assert dataclasses.replace(loaded.cfg, k=exported.cfg.k) == exported.cfg  # k means nothing to a JumpReLU SAE
    for name, tensor in sae_tensors(loaded).items():
        torch.testing.assert_close(tensor, tensors[name], rtol=0, atol=0)


def test_a_saelens_matryoshka_batchtopk_cfg_loads_as_jumprelu_with_its_widths():
    tensors = sae_tensors(export_sae(identity_matryoshka().eval(), 1.0))
    cfg = {"architecture": "matryoshka_batchtopk", "d_in": 4, "d_sae": 4, "k": 3, "matryoshka_widths": [1, 2, 4]}
    loaded = sae_from_saelens(tensors, cfg)
    assert (loaded.cfg.architecture, loaded.cfg.prefix_widths) == ("jumprelu", (1, 2, 4))
    with pytest.raises(ValueError, match="strictly increasing"):
        sae_from_saelens(tensors, {**cfg, "matryoshka_widths": [2, 1, 4]})
    with pytest.raises(ValueError, match="needs its learned 'threshold'"):
        sae_from_saelens({k: v for k, v in tensors.items() if k != "threshold"}, cfg)


def test_heldout_metrics_per_prefix_by_hand():
    exported = export_sae(identity_matryoshka().eval(), 1.0)
    report = reconstruction_report(exported, [X_HAND[:1], X_HAND[1:]])
    # mean (1.5, 0.5, 1, 2.5): total variance 4.5 + 0.5 + 2 + 4.5 = 11.5
    fvus = [p["fvu"] for p in report["matryoshka_prefixes"]]
    assert [p["width"] for p in report["matryoshka_prefixes"]] == [1, 2, 4]
    assert fvus == pytest.approx([22 / 11.5, 21 / 11.5, 0.0], abs=1e-6)
    assert [p["l0"] for p in report["matryoshka_prefixes"]] == pytest.approx([0.5, 1.0, 2.5])
    assert report["fvu"] == pytest.approx(fvus[-1], abs=1e-6) and report["l0"] == pytest.approx(2.5)


def test_other_saes_report_no_prefixes():
    sae = Sae(SaeConfig(d_in=4, d_sae=8, k=2)).initialize(torch.Generator().manual_seed(0)).eval()
    assert "matryoshka_prefixes" not in reconstruction_report(sae, [torch.randn(16, 4)])


# Planted hierarchy: 3 parent directions with 4 children each, orthonormal in d_in 32. A parent fires with
# p 0.3; a firing parent brings one of its children with p 0.5; x = parent + child + noise 0.01 (magnitudes
# 1 +- 0.1). Measured with these settings (absorption = share of parent-and-child tokens where the parent's
# latent stays silent): Matryoshka, first prefix of 6, seeds 0-2: every parent found with decoder cosine
# 0.925-0.977, absorption 0.0; seeds 3-6 missed one parent each (cosine 0.71-0.79 or absorption 0.1-0.24).
PARENTS, CHILDREN, D_IN = 3, 4, 32


def _planted(n, dirs_PD, dirs_PCD, gen):
    parent_NP = torch.rand(n, PARENTS, generator=gen) < 0.3
    child_NP = parent_NP & (torch.rand(n, PARENTS, generator=gen) < 0.5)
    which_NP = torch.randint(0, CHILDREN, (n, PARENTS), generator=gen)
    size_NP = 1 + 0.1 * torch.randn(n, PARENTS, generator=gen)
    child_size_NP = (1 + 0.1 * torch.randn(n, PARENTS, generator=gen)) * child_NP
    onehot_NPC = torch.nn.functional.one_hot(which_NP, CHILDREN).float() * child_size_NP[..., None]
    x_ND = (parent_NP * size_NP) @ dirs_PD + torch.einsum("npc,pcd->nd", onehot_NPC, dirs_PCD)
    return x_ND + 0.01 * torch.randn(n, D_IN, generator=gen), parent_NP, child_NP


@pytest.fixture
def one_thread():
    """One intra-op thread: these tiny products are fastest (and reduce in one fixed order) on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_matryoshka_first_prefix_holds_each_parent_unabsorbed_on_planted_hierarchy(one_thread):
    from pipeline.sae.initialization import init_sae
    from pipeline.sae.training import train_sae

    seed, steps, batch = 2, 1000, 512
    gen = torch.Generator().manual_seed(seed)
    q_DD, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=gen, dtype=torch.float32))
    dirs = q_DD.t()[: PARENTS * (1 + CHILDREN)]
    dirs_PD, dirs_PCD = dirs[:PARENTS], dirs[PARENTS:].reshape(PARENTS, CHILDREN, D_IN)
    data_gen = torch.Generator().manual_seed(seed + 100)
    batches = [_planted(batch, dirs_PD, dirs_PCD, data_gen)[0] for _ in range(steps)]
    cfg = SaeConfig(D_IN, 32, "matryoshka", k=2, matryoshka_widths=(6, 32))
    torch.manual_seed(seed)
    sae = init_sae(cfg, torch.cat(batches[:8]), seed)
    train_sae(
        sae,
        iter(batches),
        TrainConfig(total_steps=steps, lr=5e-3, warmup_steps=20, auxk_dead_tokens=25_600, optimizer="adam"),
    )
    x_ND, parent_NP, child_NP = _planted(8192, dirs_PD, dirs_PCD, torch.Generator().manual_seed(seed + 999))
    with torch.no_grad():
        fires_NF = sae.eval().encode(x_ND) > 0
        cos_FP = torch.nn.functional.normalize(sae.W_dec[:6], dim=1) @ dirs_PD.t()
    for p in range(PARENTS):
        best = int(cos_FP[:, p].argmax())
        assert cos_FP[best, p] >= 0.9, (p, cos_FP[:, p])
        absorbed = 1 - fires_NF[parent_NP[:, p] & child_NP[:, p], best].float().mean()
        assert absorbed <= 0.05, (p, absorbed)
        assert fires_NF[parent_NP[:, p], best].float().mean() >= 0.95
