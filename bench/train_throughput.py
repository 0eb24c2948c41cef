"""Benchmark: time-to-quality of saescope's TopK trainer against EleutherAI sparsify, on the same batches.

On the same cached activations, in one run, for each d_sae x dtype x number of
passes: every trainer's held-out FVU (measured at a few points along the run,
evaluation time not counted) and its training wall time. Steps of the trainers
are interleaved (one step of each in turn), so drifts in machine speed affect all
of them alike. The time-to-quality ratio is sparsify's wall time over the time
saescope's default trainer takes to reach sparsify's final held-out FVU
(interpolated linearly on saescope's measured curve; "not reached" if it never does).

Trainers:
  saescope       pipeline defaults: sparse TopK kernels, geometric-median b_dec, encoder at 0.5x the
                 decoder, AuxK, schedule-free signum (TrainConfig.optimizer "signum-sf", lr auto)
  saescope-adam  the same with the previous default optimizer: Adam, auto lr, warm-up + 20% linear decay
  sparsify-sf    EleutherAI sparsify's SparseCoder with its default optimizer: signum + schedule-free
                 (momentum 0.95, lr 5e-3/sqrt(d_sae/2^14)), evaluated at the schedule-free average
  sparsify-adam  the same SparseCoder with sparsify's Adam setting: lr 2e-4/sqrt(d_sae/2^14), linear
                 warm-up (5% of the steps here; sparsify's 1000 would be longer than these runs), linear decay to 0
  dense          (--dense) a plain PyTorch TopK reference written below, for raw throughput

sparsify is never a dependency of saescope: it lives in a separate benchmark environment, made with
(commands that worked, CPU only, offline wheel mirror):
    python3 -m venv /tmp/benchenv
    /tmp/benchenv/bin/pip install torch==2.13.0
    /tmp/benchenv/bin/pip install -e . torch==2.13.0
    /tmp/benchenv/bin/pip install eai_sparsify-1.3.3-py3-none-any.whl torch==2.13.0   # pulls schedulefree,
        # einops, natsort, simple-parsing; triton and bitsandbytes are optional there (eager decoder, torch Adam)

    /tmp/benchenv/bin/python bench/train_throughput.py --run runs/demo [--epochs 1,10] [--sizes 4608,16384]
        [--dtypes float32,bfloat16] [--train-tokens N] [--dense]
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path

import torch
from torch import nn

from bench.train_profile import encoder_gemm_rate, matmul_peak
from jobs.console import tune_allocator
from pipeline.evaluation.reconstruction import ReconstructionStats
from pipeline.sae.initialization import init_sae, normalization_factor
from pipeline.sae.model import SaeConfig
from pipeline.sae.optimizers import eval_weights
from pipeline.sae.schedule import auto_lr_for, default_lr, default_warmup_steps, lr_at
from pipeline.sae.training import TrainConfig, TrainState, default_auxk_dead_tokens, make_optimizer, train_step
from storage.shards import activations_dir, read_manifest
from storage.training_data import StreamSpec, TrainingStream, default_heldout_contexts, iter_heldout

K, BATCH = 32, 4096


class DenseTopK(nn.Module):
    """The reference: TopK SAE with a dense [N, F] code and dense products everywhere."""

    def __init__(self, d_in: int, d_sae: int, b_dec_init: torch.Tensor):
        super().__init__()
        W = torch.randn(d_sae, d_in, generator=torch.Generator().manual_seed(0))
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W.clone())
        self.W_enc = nn.Parameter(W.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(b_dec_init.clone())

    def forward(self, x):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        vals, idx = pre.topk(K, dim=1)
        codes = torch.zeros_like(pre).scatter(1, idx, torch.relu(vals))
        return codes @ self.W_dec + self.b_dec


class Runner:
    """One trainer: a step function, its time spent, and a reconstruct function for evaluation."""

    def __init__(self, name, step, reconstruct):
        self.name, self.step_fn, self.reconstruct = name, step, reconstruct
        self.seconds, self.tokens = 0.0, 0

    def step(self, x):
        start = time.perf_counter()
        self.step_fn(x)
        self.seconds += time.perf_counter() - start
        self.tokens += x.shape[0]


def saescope_runner(d_in, d_sae, sample, total_steps, dtype, optimizer="signum-sf"):
    sae = init_sae(SaeConfig(d_in, d_sae, "topk", K), sample, seed=0)
    cfg = TrainConfig(
        total_steps=total_steps,
        lr=auto_lr_for(optimizer, d_sae, total_steps),
        optimizer=optimizer,
        warmup_steps=default_warmup_steps(total_steps),
        auxk_dead_tokens=default_auxk_dead_tokens(total_steps * BATCH, BATCH),
        compute_dtype=dtype,
    )
    opt, state = make_optimizer(sae, cfg), TrainState.fresh(d_sae)
    sae.train()

    def reconstruct(x):
        with eval_weights(sae, opt):
            return sae.reconstruct(x)

    name = "saescope" if optimizer == "signum-sf" else f"saescope-{optimizer}"
    return Runner(name, lambda x: train_step(sae, opt, x, state, cfg), reconstruct)


def saescope_adam_runner(d_in, d_sae, sample, total_steps, dtype):
    return saescope_runner(d_in, d_sae, sample, total_steps, dtype, optimizer="adam")


def dense_runner(d_in, d_sae, sample, total_steps, dtype):
    model = DenseTopK(d_in, d_sae, sample.mean(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=default_lr(d_sae))

    def step(x):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = (model(x).float() - x).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.W_dec /= model.W_dec.norm(dim=1, keepdim=True)

    return Runner("dense", step, lambda x: model(x))


def sparsify_runner(d_in, d_sae, sample, total_steps, dtype, optimizer="signum"):
    """EleutherAI sparsify's SparseCoder, driven the way its Trainer does (None if not installed)."""
    try:
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.sign_sgd import SignSGD
    except ImportError:
        return None
    coder = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=K), device="cpu", dtype=torch.float32)
    coder.b_dec.data = sample.mean(0)
    if optimizer == "signum":
        opt = ScheduleFreeWrapper(
            SignSGD([{"params": coder.parameters(), "lr": 5e-3 / math.sqrt(d_sae / 2**14)}]), momentum=0.95
        )
        opt.train()
    else:
        opt = torch.optim.Adam(coder.parameters(), lr=default_lr(d_sae))
    warmup, peak, step_count = default_warmup_steps(total_steps), default_lr(d_sae), [0]
    since_fired = torch.zeros(d_sae, dtype=torch.long)

    def step(x):
        if optimizer == "adam":  # linear warm-up, then linear decay to 0 at the last step
            opt.param_groups[0]["lr"] = lr_at(step_count[0], total_steps, peak, warmup, 1 - warmup / total_steps)
        coder.set_decoder_norm_to_unit_norm()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = coder(x, dead_mask=since_fired > 10_000_000)
        since_fired.add_(x.shape[0])
        since_fired[out.latent_indices.flatten()] = 0
        (out.fvu + out.auxk_loss / 32).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        step_count[0] += 1

    def reconstruct(x):
        if optimizer != "signum":
            return coder(x).sae_out
        opt.eval()
        result = coder(x).sae_out
        opt.train()
        return result

    return Runner("sparsify-sf" if optimizer == "signum" else "sparsify-adam", step, reconstruct)


def sparsify_adam_runner(d_in, d_sae, sample, total_steps, dtype):
    return sparsify_runner(d_in, d_sae, sample, total_steps, dtype, optimizer="adam")


@torch.no_grad()
def heldout_fvu(runner, heldout_ND):
    stats = ReconstructionStats(heldout_ND.shape[1], 1)
    for x in heldout_ND.split(BATCH):
        stats.update(x, runner.reconstruct(x).float(), torch.zeros(x.shape[0]), torch.zeros(1, dtype=torch.bool))
    return stats.result().fvu


def load_data(run_dir: Path, train_tokens: int | None):
    """(training batches, held-out tokens [N, D], d_in): the cache's training part, or its first ``train_tokens``."""
    folder = activations_dir(run_dir)
    manifest = read_manifest(folder)
    heldout = default_heldout_contexts(manifest.n_contexts)
    stream = TrainingStream(folder, manifest, StreamSpec(batch_size=BATCH, heldout_contexts=heldout))
    n_batches = stream.batches_per_epoch()
    if train_tokens:
        n_batches = min(n_batches, max(1, train_tokens // BATCH))
    batches = []
    for x in stream.iter_batches():
        batches.append(x.float())
        if len(batches) == n_batches:
            break
    scale = normalization_factor(torch.cat(batches[:4]))
    special = torch.tensor(manifest.special_token_ids)
    held = [a[~torch.isin(t, special)] for a, t in iter_heldout(folder, manifest, heldout)]
    return [b * scale for b in batches], torch.cat(held).float() * scale, manifest.d_model


MAKERS = (sparsify_runner, sparsify_adam_runner, saescope_runner, saescope_adam_runner)
EVAL_POINTS = (0.1, 0.25, 0.5, 0.75, 1.0)
"""Fractions of the run at which every trainer's held-out FVU is measured."""


def compare(batches, heldout, steps, d_in, d_sae, dtype, with_dense: bool) -> dict:
    """{trainer: [(seconds, held-out FVU), ...]} at ``EVAL_POINTS`` (and before the first step)."""
    sample = torch.cat(batches[:4])
    makers = MAKERS + ((dense_runner,) if with_dense else ())
    runners = [r for r in (make(d_in, d_sae, sample, steps, dtype) for make in makers) if r is not None]
    marks = {max(1, round(steps * f)) for f in EVAL_POINTS}
    curves = {r.name: [(0.0, heldout_fvu(r, heldout))] for r in runners}
    for i in range(steps):
        x = batches[i % len(batches)]
        for runner in runners:
            runner.step(x)
        if i + 1 in marks:
            for runner in runners:
                curves[runner.name].append((runner.seconds, heldout_fvu(runner, heldout)))
    return curves


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First time the curve's FVU is at or below ``target``, linear between measured points (None: never)."""
    for (t0, f0), (t1, f1) in zip(curve, curve[1:], strict=False):
        if f1 <= target:
            return t1 if f0 == f1 or f0 <= target else t0 + (t1 - t0) * (f0 - target) / (f0 - f1)
    return None


def cpu_flags() -> str:
    try:
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    except (OSError, AttributeError):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted)


def _cell(curve) -> str:
    return f"{curve[-1][1]:.4f} {curve[-1][0]:6.1f}s" if curve else "     n/a        "


def _ratio(curves: dict, reference: str) -> str:
    if reference not in curves or "saescope" not in curves:
        return "n/a"
    seconds, target = curves[reference][-1]
    reached = time_to_reach(curves["saescope"], target)
    return f"{seconds / reached:.2f}x" if reached else "not reached"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="run with an activation cache (make demo builds runs/demo)")
    parser.add_argument("--epochs", default="1,10", help="passes over the training batches (comma list)")
    parser.add_argument("--sizes", default="4608,16384", help="d_sae values")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="autocast dtypes")
    parser.add_argument("--train-tokens", type=int, default=None, help="train on the first N tokens only (a subset)")
    parser.add_argument("--dense", action="store_true", help="also run the plain dense PyTorch reference")
    args = parser.parse_args()
    tune_allocator()
    torch.manual_seed(0)
    batches, heldout, d_in = load_data(Path(args.run), args.train_tokens)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"data: {args.run}, {len(batches)} training batches of {BATCH} tokens ({len(batches) * BATCH} tokens per "
        f"pass), {heldout.shape[0]} held-out tokens; k={K}, threads={torch.get_num_threads()}"
    )
    print(f"cpu: {cpu_flags()}")
    peaks = {dt: matmul_peak(dt) for dt in dtypes}
    for dt in dtypes:
        rates = ", ".join(f"d_sae {f}: {encoder_gemm_rate(d_in, f, dt):.0f}" for f in sizes)
        print(
            f"matmul peak {str(dt)[6:]}: {peaks[dt]:.0f} GFLOP/s; encoder GEMM alone (GFLOP/s, fraction) {rates} "
            f"({', '.join(f'{encoder_gemm_rate(d_in, f, dt) / peaks[dt]:.0%}' for f in sizes)})"
        )
    names = ("sparsify-sf", "sparsify-adam", "saescope", "saescope-adam")
    header = " ".join(f"{n + ' FVU  wall':>20}" for n in names)
    print(f"{'d_sae':>6} {'dtype':8} {'passes':>6} {'steps':>5} {header} {'TTQ vs sf':>11} {'TTQ vs adam':>11}")
    for d_sae in sizes:
        for dtype in dtypes:
            for epochs in (float(e) for e in args.epochs.split(",")):
                steps = max(1, round(len(batches) * epochs))
                curves = compare(batches, heldout, steps, d_in, d_sae, dtype, args.dense)
                cells = " ".join(f"{_cell(curves.get(n)):>20}" for n in names)
                ttq = f"{_ratio(curves, 'sparsify-sf'):>11} {_ratio(curves, 'sparsify-adam'):>11}"
                print(f"{d_sae:6d} {str(dtype)[6:]:8} {epochs:6g} {steps:5d} {cells} {ttq}", flush=True)
                for name, curve in curves.items():
                    points = "  ".join(f"{t:.1f}s {f:.4f}" for t, f in curve)
                    print(f"    curve {name:14s} {points}", flush=True)


if __name__ == "__main__":
    main()
