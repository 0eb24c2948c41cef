"""The sparse TopK kernels equal their dense eager twins, values and gradients."""

import pytest
import torch

from pipeline.sae.sparse_ops import (
    encode_selected,
    encode_selected_eager,
    sparse_decode,
    sparse_decode_eager,
    sparse_transpose_matmul,
)

N, D, F, K = 37, 8, 50, 5


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    W = torch.randn(D, F, generator=g, dtype=torch.float64)
    b = torch.randn(F, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(F, generator=g)[:K] for _ in range(N)])
    idx[0, 1] = idx[1, 2] = 7  # the same latent used by several tokens
    return x, W, b, idx


def _grads(fn, *tensors):
    """(fn's output, gradients of a fixed weighted sum of it with respect to each input), on the CPU."""
    tensors = [t.clone().requires_grad_() for t in tensors]
    out = fn(*tensors)
    weight = torch.linspace(-1, 2, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    (out * weight).sum().backward()
    return out.detach().cpu(), [t.grad.cpu() for t in tensors]


def test_encode_selected_matches_dense(problem):
    x, W, b, idx = problem
    b_dec = torch.linspace(-1, 1, D, dtype=torch.float64)
    W_FD = W.t().contiguous()
    pre = (x - b_dec) @ W + b
    fast, fast_grads = _grads(lambda x_, bd, W_, b_: encode_selected(x_, bd, W_, b_, idx, pre), x, b_dec, W_FD, b)
    slow, slow_grads = _grads(lambda x_, bd, W_, b_: encode_selected_eager(x_, bd, W_, b_, idx), x, b_dec, W_FD, b)
    torch.testing.assert_close(fast, slow)
    for a, e in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a.to(e.dtype), e)


def test_sparse_decode_matches_dense(problem):
    _, W, _, idx = problem
    acts = torch.rand(N, K, dtype=torch.float64)
    acts[3, 0] = 0.0
    W_FD = W.t().contiguous()
    fast, fast_grads = _grads(lambda a, w: sparse_decode(a, idx, w), acts, W_FD)
    slow, slow_grads = _grads(lambda a, w: sparse_decode_eager(a, idx, w), acts, W_FD)
    torch.testing.assert_close(fast, slow)
    for a, e in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, e)


def test_sparse_transpose_matmul_by_hand():
    idx = torch.tensor([[0, 2], [2, 1]])
    vals = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    M = torch.tensor([[1.0, 10.0], [100.0, 1000.0]])
    out = sparse_transpose_matmul(vals, idx, M, 4)
    expected = torch.tensor([[1.0, 10.0], [400.0, 4000.0], [2.0 + 300.0, 20.0 + 3000.0], [0.0, 0.0]])
    torch.testing.assert_close(out, expected)
