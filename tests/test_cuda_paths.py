"""The CUDA paths against their CPU and eager twins; skipped where no CUDA device is present (CI has none).

Run them on a GPU machine with ``pytest tests/test_cuda_paths.py``. TF32 is off so
float32 comparisons hold at float tolerances. Each test builds its inputs on the
CPU and compares what the GPU computes with what the CPU (or the dense eager
twin on the GPU) computes from the same inputs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_cache_config
from test_sparse_ops import _grads
from test_training import planted_data, train_on_planted

from pipeline.lm.activations import compute_activations
from pipeline.sae.model import Sae, SaeConfig
from pipeline.sae.sparse_ops import encode_selected, encode_selected_eager, sparse_decode, sparse_decode_eager
from pipeline.sae.training import TrainConfig, TrainState, make_optimizer, train_step
from storage.shards import activations_dir, iter_shards, read_manifest
from storage.training_data import to_device

DEVICE = "cuda"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 matmuls in full precision (no TF32) while a test runs."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def value_and_grads(fn, *tensors) -> list[torch.Tensor]:
    out, grads = _grads(fn, *tensors)
    return [out, *grads]


def sparse_problem(n=300, d=16, f=200, k=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    b_dec = torch.randn(d, generator=g, dtype=torch.float64)
    W_FD = torch.randn(f, d, generator=g, dtype=torch.float64)
    b_enc = torch.randn(f, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(f, generator=g)[:k] for _ in range(n)])
    acts = torch.rand(n, k, generator=g, dtype=torch.float64)
    return x, b_dec, W_FD, b_enc, idx, acts


def kernel_results(device: str) -> dict[str, list[torch.Tensor]]:
    """Values and gradients of each sparse kernel and its eager twin on ``device``, moved to the CPU."""
    x, b_dec, W_FD, b_enc, idx, acts = (t.to(device) for t in sparse_problem())
    pre = (x - b_dec) @ W_FD.T + b_enc
    encoder_inputs = (x, b_dec, W_FD, b_enc)
    return {
        "encode": value_and_grads(lambda *t: encode_selected(*t, idx, pre), *encoder_inputs),
        "encode_eager": value_and_grads(lambda *t: encode_selected_eager(*t, idx), *encoder_inputs),
        "decode": value_and_grads(lambda a, w: sparse_decode(a, idx, w), acts, W_FD),
        "decode_eager": value_and_grads(lambda a, w: sparse_decode_eager(a, idx, w), acts, W_FD),
    }


def test_sparse_kernels_on_cuda_equal_their_eager_twins_and_the_cpu():
    cuda, cpu = kernel_results(DEVICE), kernel_results("cpu")
    for kernel in ("encode", "decode"):
        for fast, twin, reference in zip(cuda[kernel], cuda[kernel + "_eager"], cpu[kernel], strict=True):
            torch.testing.assert_close(fast.to(twin.dtype), twin)
            torch.testing.assert_close(fast.to(reference.dtype), reference)


def test_topk_sae_forward_and_gradients_on_cuda_equal_the_cpu():
    sae = Sae(SaeConfig(d_in=16, d_sae=96, k=6)).initialize(torch.Generator().manual_seed(0))
    x = planted_data(512)[0]
    grads = {}
    for device in ("cpu", DEVICE):
        model = copy.deepcopy(sae).to(device)
        out = model(x.to(device))
        out.x_hat_ND.pow(2).sum().backward()
        grads[device] = [out.x_hat_ND.detach().cpu()] + [p.grad.cpu() for p in model.parameters()]
    for cuda, cpu in zip(grads[DEVICE], grads["cpu"], strict=True):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu", "matryoshka"])
def test_one_training_step_on_cuda_equals_the_cpu(arch):
    x = planted_data(1024, seed=2)[0]
    sae = Sae(SaeConfig(d_in=16, d_sae=64, architecture=arch, k=4)).initialize(torch.Generator().manual_seed(1))
    cfg = TrainConfig(total_steps=10, lr=1e-2, auxk_dead_tokens=1)
    weights = {}
    for device in ("cpu", DEVICE):
        model = copy.deepcopy(sae).to(device)
        state = TrainState.fresh(64, device)
        state.tokens_since_fired_F[::2] = 10  # half the latents dead: AuxK takes part
        train_step(model, make_optimizer(model, cfg), to_device(x, torch.device(device)), state, cfg)
        weights[device] = {name: p.detach().cpu() for name, p in model.state_dict().items()}
    for name, cpu in weights["cpu"].items():
        torch.testing.assert_close(weights[DEVICE][name], cpu, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_training_on_cuda_recovers_planted_features(compute_dtype):
    recovered, history = train_on_planted(DEVICE, compute_dtype)
    assert recovered >= 0.8
    assert history[-1] < 0.2 * history[0]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_activations_copied_through_pinned_memory_equal_the_cpu(tiny_model, out_dtype):
    tokens = torch.randint(4, tiny_model.config.vocab_size, (37, 24), generator=torch.Generator().manual_seed(0))
    on_cpu = compute_activations(tiny_model, tokens, point=2, batch_size=8, out_dtype=out_dtype)
    counted = []
    on_cuda = compute_activations(
        copy.deepcopy(tiny_model).to(DEVICE), tokens, 2, 8, out_dtype=out_dtype, on_batch=counted.append
    )
    assert on_cuda.device.type == "cpu" and on_cuda.is_pinned() and on_cuda.dtype == out_dtype
    assert sum(counted) == tokens.numel()
    tolerance = 1e-4 if out_dtype == torch.float32 else 2e-2
    torch.testing.assert_close(on_cuda.float(), on_cpu.float(), rtol=tolerance, atol=tolerance)


def test_batches_reach_the_gpu_unchanged():
    rows = torch.randn(100, 16).to(torch.bfloat16)
    moved = to_device(rows, torch.device(DEVICE))
    assert moved.device.type == "cuda" and moved.dtype == torch.float32
    assert torch.equal(moved.cpu(), rows.float())


def test_cache_and_train_jobs_on_cuda_match_the_cpu(tiny_run, tiny_model_dir, tmp_path):
    from jobs.cache import run_cache
    from jobs.train import run_train
    from jobs.training.config import TrainJobConfig

    cuda_run = tmp_path / "cuda-run"
    run_cache(tiny_cache_config(cuda_run, tiny_model_dir, tiny_run.parent / "corpus.txt", device=DEVICE))
    cached = {}
    for run in (tiny_run, cuda_run):
        folder = activations_dir(run)
        shards = list(iter_shards(folder, read_manifest(folder)))
        cached[run] = (torch.cat([s.tokens_CT for s in shards]), torch.cat([s.activations_CTD for s in shards]))
    assert torch.equal(cached[cuda_run][0], cached[tiny_run][0])
    torch.testing.assert_close(cached[cuda_run][1], cached[tiny_run][1], rtol=1e-4, atol=1e-4)

    fvu = {}
    for device in ("cpu", DEVICE):
        cfg = TrainJobConfig(
            run=str(cuda_run),
            name=device,
            d_sae=64,
            k=4,
            tokens=256 * 24,
            batch_size=256,
            lm_eval_contexts=8,
            device=device,
            dtype="float32",
        )
        run_train(cfg)
        fvu[device] = json.loads((cuda_run / "saes" / device / "metrics.json").read_text())["fvu"]
    assert fvu[DEVICE] == pytest.approx(fvu["cpu"], rel=0.05)
