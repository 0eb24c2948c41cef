"""Tiny exact SAE tests with hand-set weights: selection, thresholds, decoder norms, folding."""

import pytest
import torch

from pipeline.sae.model import Sae, SaeConfig, batch_topk_select, export_sae
from pipeline.sae.saelens import sae_from_tensors, sae_tensors
from pipeline.sae.training import normalize_decoder, remove_parallel_decoder_grad


def identity_sae(arch="topk", k=2, d=4):
    """d_sae = d, W_enc = W_dec = I, biases 0: codes are the input's coordinates."""
    sae = Sae(SaeConfig(d_in=d, d_sae=d, architecture=arch, k=k, jumprelu_init_threshold=0.5))
    with torch.no_grad():
        sae.W_enc_FD.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae.eval()


def test_topk_keeps_the_k_largest_and_relus_them():
    sae = identity_sae(k=2)
    x = torch.tensor([[3.0, -1.0, 5.0, 0.5], [-2.0, -3.0, 0.2, -1.0]])
    feats = sae.encode(x)
    assert torch.equal(feats, torch.tensor([[3.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.2, 0.0]]))
    torch.testing.assert_close(sae(x).x_hat_ND, feats)


def test_b_dec_is_subtracted_before_encoding():
    sae = identity_sae(k=1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    feats = sae.encode(torch.tensor([[11.0, 2.0, 0.0, 0.0]]))
    assert torch.equal(feats, torch.tensor([[0.0, 2.0, 0.0, 0.0]]))


def test_jumprelu_threshold_is_strict():
    sae = identity_sae(arch="jumprelu")
    x = torch.tensor([[0.49, 0.51, 2.0, -1.0]])
    torch.testing.assert_close(sae.encode(x), torch.tensor([[0.0, 0.51, 2.0, 0.0]]))


def test_jumprelu_threshold_gets_a_straight_through_gradient():
    sae = identity_sae(arch="jumprelu")
    sae.cfg = SaeConfig(4, 4, "jumprelu", jumprelu_init_threshold=0.5, jumprelu_bandwidth=0.1)
    x = torch.tensor([[0.52, 0.9, 0.0, 0.0]])
    sae.encode(x).sum().backward()
    grad = sae.log_threshold.grad
    # latent 0 sits inside the kernel window |pre - t| < eps/2: d/dt = -(t / eps) * chain(t = e^log t)
    assert grad[0].item() == pytest.approx(-(0.5 / 0.1) * 0.5, rel=1e-4)
    assert grad[1].item() == 0.0


def test_batch_topk_selects_over_the_whole_batch():
    pre = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 0.5, -1.0, -2.0]])
    idx, keep, cutoff = batch_topk_select(pre, k=2)
    chosen = sorted((n, int(idx[n, j])) for n in range(2) for j in range(idx.shape[1]) if keep[n, j])
    assert chosen == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert cutoff.item() == 6.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_topk_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(16, 64, generator=g)
    pre[3] += 5.0  # one token far more active than the rest: saturates the first candidate width
    idx, keep, _ = batch_topk_select(pre, k=3)
    selected = torch.zeros_like(pre, dtype=torch.bool)
    selected[torch.arange(16)[:, None].expand_as(idx)[keep], idx[keep]] = True
    flat = pre.reshape(-1)
    expected = torch.zeros(flat.numel(), dtype=torch.bool)
    top = flat.topk(48).indices
    expected[top[flat[top] > 0]] = True
    assert torch.equal(selected.reshape(-1), expected)


def test_sparse_forward_equals_dense_twin_with_gradients():
    torch.manual_seed(0)
    sae = Sae(SaeConfig(d_in=8, d_sae=32, k=4)).initialize(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    x = torch.randn(10, 8)
    out = sae(x)
    out.x_hat_ND.pow(2).sum().backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    dense = sae.decode(sae.activation(sae.pre_acts(x)))
    dense.pow(2).sum().backward()
    torch.testing.assert_close(out.x_hat_ND, dense)
    for name, param in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], param.grad, msg=name)


def test_decoder_norm_handling():
    sae = Sae(SaeConfig(d_in=3, d_sae=2, k=1))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]]))
    sae.W_dec.grad = torch.tensor([[2.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    remove_parallel_decoder_grad(sae)
    torch.testing.assert_close(sae.W_dec.grad, torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0 - 1.4 * 0.6, 1.0 - 1.4 * 0.8]]))
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    normalize_decoder(sae)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu", "matryoshka"])
def test_folding_the_scale_gives_the_same_reconstruction_on_raw_inputs(arch):
    torch.manual_seed(1)
    cfg = SaeConfig(d_in=6, d_sae=20, architecture=arch, k=3, jumprelu_init_threshold=0.3)
    sae = Sae(cfg).initialize(torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_enc.normal_(std=0.1)
        sae.b_dec.normal_()
        if arch in ("batchtopk", "matryoshka"):
            sae.batch_threshold.fill_(0.4)
    sae.eval()
    scale = 2.5
    raw = torch.randn(50, 6) * 4
    exported = export_sae(sae, scale)
    torch.testing.assert_close(exported.reconstruct(raw), sae.reconstruct(raw * scale) / scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exported.encode(raw), sae.encode(raw * scale) / scale, rtol=1e-5, atol=1e-5)
    assert exported.cfg.architecture == ("jumprelu" if arch in ("batchtopk", "matryoshka") else arch)


def test_tensor_round_trip_and_shape_checks():
    sae = Sae(SaeConfig(d_in=4, d_sae=6, architecture="jumprelu")).initialize(torch.Generator().manual_seed(0))
    tensors = sae_tensors(sae)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == {
        "W_enc": (4, 6),
        "b_enc": (6,),
        "W_dec": (6, 4),
        "b_dec": (4,),
        "threshold": (6,),
    }
    again = sae_from_tensors(sae.cfg, tensors)
    x = torch.randn(5, 4)
    torch.testing.assert_close(again.encode(x), sae.encode(x))
    tensors["W_dec"] = tensors["W_dec"][:5]
    with pytest.raises(ValueError, match=r"W_dec has shape \(5, 4\), expected \(6, 4\)"):
        sae_from_tensors(sae.cfg, tensors)


def test_bad_hyperparameters_are_clear_errors():
    with pytest.raises(ValueError, match="k must be between 1 and d_sae - 1"):
        SaeConfig(d_in=4, d_sae=8, k=8)
    with pytest.raises(ValueError, match="unknown SAE architecture 'gated'"):
        SaeConfig(d_in=4, d_sae=8, architecture="gated")
