"""Schedule-free signum: hand-computed steps, unit-norm rows, the eval-weight swap, exact resume."""

import pytest
import torch

from pipeline.sae.model import Sae, SaeConfig
from pipeline.sae.optimizers import ScheduleFreeSignum, eval_weights
from pipeline.sae.training import TrainConfig, TrainState, make_optimizer, train_step


def _step(optimizer, p, grad, lr):
    p.grad = torch.tensor(grad)
    optimizer.param_groups[0]["lr"] = lr
    optimizer.step()


def test_two_steps_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = ScheduleFreeSignum([p], lr=0.1, momentum=0.5)
    # z = 1 - 0.1 sign(0.3), -2 - 0.1 sign(-0.5); first average weight is 1: x = z; y = z
    _step(opt, p, [0.3, -0.5], 0.1)
    assert torch.allclose(p, torch.tensor([0.9, -1.9]))
    assert torch.allclose(opt.eval_point(p), torch.tensor([0.9, -1.9]))
    # lr 0.2: z = [1.1, -1.9] (sign 0 moves nothing); c = 0.04 / (0.01 + 0.04) = 0.8
    # x = 0.2 * 0.9 + 0.8 * 1.1 = 1.06; y = 0.5 z + 0.5 x = 1.08
    _step(opt, p, [-1.0, 0.0], 0.2)
    assert torch.allclose(opt.state[p]["z"], torch.tensor([1.1, -1.9]))
    assert torch.allclose(opt.eval_point(p), torch.tensor([1.06, -1.9]))
    assert torch.allclose(p, torch.tensor([1.08, -1.9]))


def test_average_power_weights_later_iterates():
    p = torch.nn.Parameter(torch.tensor([0.0]))
    opt = ScheduleFreeSignum([p], lr=1.0, momentum=0.0, average_power=2.0)
    _step(opt, p, [-1.0], 1.0)  # z = 1, x = 1
    _step(opt, p, [-1.0], 1.0)  # z = 2, c = 4 / (1 + 4): x = 0.2 * 1 + 0.8 * 2 = 1.8
    assert opt.eval_point(p).item() == pytest.approx(1.8)
    assert p.item() == pytest.approx(2.0)  # momentum 0: y = z


def test_unit_rows_keep_z_on_the_sphere():
    W = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    opt = ScheduleFreeSignum([{"params": [W], "unit_rows": True}], lr=0.5, momentum=0.9)
    W.grad = torch.tensor([[0.0, -1.0], [1.0, 1.0]])
    opt.step()
    z = opt.state[W]["z"]
    assert torch.allclose(z.norm(dim=1), torch.ones(2))
    assert torch.allclose(z[0], torch.tensor([1.0, 0.5]) / 1.25**0.5)


def _trained(arch="topk", steps=6):
    torch.manual_seed(0)
    sae = Sae(SaeConfig(d_in=8, d_sae=16, architecture=arch, k=3)).initialize(torch.Generator().manual_seed(1))
    cfg = TrainConfig(total_steps=steps, lr=0.05, optimizer="signum-sf", auxk_dead_tokens=64)
    opt, state = make_optimizer(sae, cfg), TrainState.fresh(16)
    x = torch.randn(steps, 32, 8, generator=torch.Generator().manual_seed(2))
    sae.train()
    for i in range(steps):
        train_step(sae, opt, x[i], state, cfg)
    return sae.eval(), opt, x[0]


def test_eval_weights_are_the_average_with_unit_decoder_and_restore_exactly():
    sae, opt, _ = _trained()
    training = {k: v.clone() for k, v in sae.state_dict().items()}
    raw_dec = opt.eval_point(sae.W_dec).clone()
    assert not torch.allclose(raw_dec.norm(dim=1), torch.ones(16))  # averaging unit rows shrinks them
    with eval_weights(sae, opt):
        norms = raw_dec.norm(dim=1, keepdim=True)
        assert torch.allclose(sae.W_dec, raw_dec / norms)
        assert torch.allclose(sae.W_enc_FD, opt.eval_point(sae.W_enc_FD) * norms)
        assert torch.allclose(sae.b_dec, opt.eval_point(sae.b_dec))
    for name, value in sae.state_dict().items():
        assert torch.equal(value, training[name]), name


def test_folding_decoder_norms_keeps_a_jumprelu_function():
    sae, opt, x = _trained("jumprelu")
    saved = [p.detach().clone() for p in sae.parameters()]
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(opt.eval_point(p))
        unfolded = sae(x).x_hat_ND
        for p, v in zip(sae.parameters(), saved, strict=True):
            p.copy_(v)
        with eval_weights(sae, opt):
            folded = sae(x).x_hat_ND
    assert torch.allclose(folded, unfolded, atol=1e-5)


def test_adam_eval_weights_are_the_parameters():
    sae = Sae(SaeConfig(d_in=8, d_sae=16, architecture="topk", k=3)).initialize(torch.Generator().manual_seed(1))
    opt = make_optimizer(sae, TrainConfig(total_steps=1, lr=1e-3, optimizer="adam"))
    with eval_weights(sae, opt) as same:
        assert same is sae


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd': choose one of adam, signum-sf"):
        TrainConfig(total_steps=1, lr=1e-3, optimizer="sgd")
