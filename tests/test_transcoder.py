"""Skip transcoders: sparse path equals its dense twin, export folds both scales, training fits an MLP."""

import pytest
import torch

from pipeline.sae.initialization import init_transcoder
from pipeline.sae.model import SaeConfig
from pipeline.sae.training import TrainConfig, Trainee, TrainState, make_optimizer, train_many
from pipeline.sae.transcoder import Transcoder, export_transcoder


def _random_transcoder(arch="topk", seed=0, d=12, f=40, k=4):
    torch.manual_seed(seed)
    tc = Transcoder(SaeConfig(d, f, arch, k))
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_(0, 0.3)
    return tc


def test_encoder_subtracts_nothing_and_skip_adds_a_linear_path():
    tc = _random_transcoder().eval()
    x = torch.randn(9, 12)
    pre = x @ tc.W_enc + tc.b_enc
    torch.testing.assert_close(tc.pre_acts(x), pre)
    dense = tc.decode(tc.encode(x)) + x @ tc.W_skip.t()
    torch.testing.assert_close(tc(x).x_hat_ND, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tc.reconstruct(x), dense, rtol=1e-5, atol=1e-5)


def test_sparse_gradients_equal_the_dense_twin():
    tc = _random_transcoder().train()
    x, y = torch.randn(16, 12), torch.randn(16, 12)
    (tc(x).x_hat_ND - y).pow(2).sum().backward()
    sparse = {n: p.grad.clone() for n, p in tc.named_parameters()}
    tc.zero_grad()
    (tc.decode(tc.encode(x)) + tc.skip(x) - y).pow(2).sum().backward()
    for name, p in tc.named_parameters():
        torch.testing.assert_close(sparse[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_export_takes_raw_activations(arch):
    tc = _random_transcoder(arch).eval()
    if arch == "batchtopk":
        tc.batch_threshold.fill_(0.2)
    s_in, s_out = 3.0, 0.5
    x = torch.randn(7, 12)
    exported = export_transcoder(tc, s_in, s_out)
    torch.testing.assert_close(exported.reconstruct(x), tc.reconstruct(s_in * x) / s_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(exported.encode(x), tc.encode(s_in * x) / s_in, rtol=1e-4, atol=1e-5)


def test_training_fits_a_small_mlp_far_better_than_the_mean():
    """y = relu(x A) B: a skip transcoder reaches a low FVU of y; with y linear in x the skip alone fits it."""
    torch.manual_seed(0)
    d, hidden = 16, 24
    A, B = torch.randn(d, hidden) / d**0.5, torch.randn(hidden, d) / hidden**0.5

    def batches():
        while True:
            x = torch.randn(512, d)
            yield x, torch.relu(x @ A) @ B

    tc = init_transcoder(SaeConfig(d, 64, "topk", 8), torch.relu(torch.randn(512, d) @ A) @ B, seed=0)
    cfg = TrainConfig(total_steps=300, lr=3e-3)
    trainee = Trainee(tc, make_optimizer(tc, cfg), TrainState.fresh(64), cfg, pick=lambda batch: batch)
    train_many([trainee], batches())
    assert trainee.state.step == 300
    assert trainee.last.fvu < 0.15


@pytest.mark.parametrize(
    ("arch", "name"), [("topk", "topk_skip_transcoder"), ("batchtopk", "jumprelu_skip_transcoder")]
)
def test_saelens_layout_round_trip(arch, name):
    from pipeline.sae.transcoder_format import transcoder_cfg_dict, transcoder_from_saelens, transcoder_tensors

    tc = _random_transcoder(arch).eval()
    if arch == "batchtopk":
        tc.batch_threshold.fill_(0.2)
    exported = export_transcoder(tc, 2.0, 0.5)
    cfg = transcoder_cfg_dict(exported, 3, {"model_name": "m"}, {})
    assert cfg["architecture"] == name and cfg["meta"]["hook_name_out"] == "blocks.3.hook_mlp_out"
    tensors = transcoder_tensors(exported)
    assert tensors["W_enc"].shape == (12, 40) and tensors["W_skip"].shape == (12, 12)
    loaded = transcoder_from_saelens(tensors, cfg)
    x = torch.randn(8, 12)
    torch.testing.assert_close(loaded.reconstruct(x), exported.reconstruct(x))
    cfg.pop("activation_fn")  # SAELens' own files name the activation by the architecture only
    torch.testing.assert_close(transcoder_from_saelens(tensors, cfg).reconstruct(x), exported.reconstruct(x))
