"""Benchmark: all-layer transcoder training tokens/s, per-layer steps against the stacked step, and the FLOP limit.

On the real model of a run (its cache gives the token stream), at the demo's sizes
(every layer, d_sae 2304, TopK k 32, 1024 tokens per step, schedule-free signum),
in one run and interleaved rep by rep so drifts in machine speed touch all alike:
  * bare forward: tokens/s of ``mlp_io`` (the model through all blocks, every layer's
    MLP input and output captured), the part of a step no transcoder change can remove,
    and of ``mlp_io_stacked`` (the same into [L, N, D] buffers: "forward-stacked");
  * per-layer: today's loop, one forward then ``train_step`` for each layer in turn
    (what ``train_many`` does in ``saescope train --transcoder``);
  * stacked: one forward into [L, N, D] buffers (``mlp_io_stacked``) then
    ``pipeline.sae.stacked.stacked_step`` for all layers (what the job runs for a TopK set);
  * the matmul peak (the best of a 2048^3 GEMM and the MLP's GEMMs) in float32 and bfloat16, the FLOPs per token of the
    forward through all blocks plus the transcoders' forward and backward, and the limit
    peak / FLOPs (tokens/s at the best dtype's peak).
Then a per-phase profile (torch.profiler) of one step of each path, and the quality
check: both paths start from the same weights and train on the same batches during the
timed reps; their held-out FVU on the next batches is printed per layer.

    python bench/transcoder_throughput.py --run /tmp/speedrun [--reps 6] [--dtype auto]

The paths alternate step by step; each step is timed in wall and in CPU (process) seconds,
the latter less sensitive to other jobs on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

import pipeline.sae.stacked as stacked_module
import pipeline.sae.training as training
from jobs.run import load_run_model
from jobs.training.transcoders import ContextBatches, training_tokens
from pipeline.lm.activations import mlp_io, mlp_io_stacked
from pipeline.lm.hooks import decoder_blocks
from pipeline.runtime.precision import choose_dtype
from pipeline.sae.initialization import init_transcoder, normalization_factor
from pipeline.sae.model import SaeConfig
from pipeline.sae.optimizers import eval_weights
from pipeline.sae.schedule import signum_sf_lr
from pipeline.sae.stacked import stack_members, stacked_step, unstack_members
from pipeline.sae.training import TrainConfig, TrainState, make_optimizer, train_step
from storage.shards import activations_dir, read_manifest

D_SAE, K, BATCH = 2304, 32, 1024  # jobs/demo.py DEMO_TRANSCODER_D_SAE, the default k, DEMO_TRANSCODER_BATCH
PHASES = (
    "model forward",
    "encoder GEMM",
    "skip GEMM",
    "top-k",
    "decode",
    "encoder bwd",
    "AuxK",
    "casts",
    "optimizer",
    "other ops",
    "untracked",
)


PEAK_SHAPES = ((2048, 2048, 2048), (1024, 576, 1536), (1024, 1536, 576))
"""GEMMs timed for the peak: a large square one and the model's own MLP shapes at 1024 tokens."""


def matmul_peak(dtype: torch.dtype, repeats: int = 3) -> float:
    """Best GFLOP/s over ``PEAK_SHAPES`` in ``dtype``, best of a few tries each."""
    rates = []
    for m, k, n in PEAK_SHAPES:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        rates.append(2 * m * k * n / best / 1e9)
    return max(rates)


def flops_per_token(model: nn.Module, ctx_len: int, n_layers: int, d: int) -> dict[str, float]:
    """Forward through every block (2 x linear weights + attention's two T x T products) and the
    transcoders' forward and backward: encoder GEMM, skip GEMM and its weight gradient, and the
    sparse decode, its two gradients and the sparse encoder gradient (2 K D each)."""
    linear = sum(m.weight.numel() for m in decoder_blocks(model).modules() if isinstance(m, nn.Linear))
    forward = 2 * linear + n_layers * 2 * 2 * ctx_len * d
    transcoders = n_layers * (2 * d * D_SAE + 2 * 2 * d * d + 4 * 2 * K * d)
    return {"forward": forward, "transcoders": transcoders, "total": forward + transcoders}


def fresh_members(first: dict, layers, d: int, cfg: TrainConfig):
    """Per-layer (transcoder, optimizer, state) as ``jobs.training.transcoders._fresh`` makes them, and scales."""
    members, scales = [], []
    for layer in layers:
        x, y = first[layer]
        s_in, s_out = normalization_factor(x), normalization_factor(y)
        tc = init_transcoder(SaeConfig(d, D_SAE, "topk", K), y * s_out, seed=layer)
        members.append((tc, make_optimizer(tc, cfg), TrainState.fresh(D_SAE)))
        scales.append((s_in, s_out))
    return members, scales


def per_layer_step(members, scales, batch, layers, cfg) -> None:
    for (tc, opt, state), (s_in, s_out), layer in zip(members, scales, layers, strict=True):
        x, y = batch[layer]
        train_step(tc, opt, x * s_in, state, cfg, target_ND=y * s_out)


def stacked_train_step(stacked, batch, cfg) -> None:
    """``batch``: the scaled (x_LND, y_LND) of ``mlp_io_stacked``, as the job feeds it."""
    tcs, optimizer, state = stacked
    stacked_step(tcs, optimizer, *batch, state, cfg)


def timed(seconds: dict, label: str, fn):
    """fn(), recording its wall and CPU seconds under ``label``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    seconds[label].append({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu})
    return result


def _phase(event) -> str:
    names, node = [], event
    while node is not None:
        names.append(node.name)
        node = node.cpu_parent
    joined = " | ".join(names)
    if "model forward" in names:
        return "model forward"
    if "Optimizer.step" in joined:
        return "optimizer"
    if "auxk" in names:
        return "AuxK"
    if "_EncodeSelected" in joined:
        return "encoder bwd"
    if "mbedding" in joined:
        return "decode"
    if event.name in ("aten::addmm", "aten::baddbmm") and "Backward" not in joined:
        return "encoder GEMM"
    if event.name in ("aten::mm", "aten::bmm", "aten::linear", "aten::matmul"):
        return "skip GEMM"
    if event.name in ("aten::copy_", "aten::_to_copy"):
        return "casts"
    if event.name == "aten::topk":
        return "top-k"
    return "other ops"


@contextmanager
def labelled_auxk():
    """Put AuxK (either path's) under one profiler label."""
    real_many, real_stacked = training.auxk_loss, stacked_module.stacked_auxk

    def wrap(fn):
        def labelled(*args, **kwargs):
            with record_function("auxk"):
                return fn(*args, **kwargs)

        return labelled

    training.auxk_loss, stacked_module.stacked_auxk = wrap(real_many), wrap(real_stacked)
    try:
        yield
    finally:
        training.auxk_loss, stacked_module.stacked_auxk = real_many, real_stacked


def profiled(forward_fn, step_fn) -> tuple[float, dict]:
    """Wall seconds of one forward + step, and each phase's seconds."""
    with labelled_auxk(), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        with record_function("model forward"):
            batch = forward_fn()
        step_fn(batch)
        wall = time.perf_counter() - start
    phases: dict[str, float] = defaultdict(float)
    for event in prof.events():
        phases[_phase(event)] += event.self_cpu_time_total / 1e6
    phases["untracked"] = max(0.0, wall - sum(phases.values()))
    return wall, phases


def heldout_fvu(members, scales, batch, layers) -> list[float]:
    """FVU of each layer's transcoder (at its evaluation weights) on one batch."""
    fvus = []
    for (tc, opt, _), (s_in, s_out), layer in zip(members, scales, layers, strict=True):
        x, y = batch[layer][0] * s_in, batch[layer][1] * s_out
        with torch.no_grad(), eval_weights(tc, opt):
            y_hat = tc.reconstruct(x)
        fvus.append(float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()))
    return fvus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--reps", type=int, default=6, help="timed steps of each path (alternating)")
    parser.add_argument("--dtype", default="auto", help="SAE compute dtype: auto, float32 or bfloat16")
    parser.add_argument("--heldout-batches", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    run_dir = Path(args.run)
    manifest = read_manifest(activations_dir(run_dir))
    model = load_run_model(manifest, "cpu").model.to(getattr(torch, manifest.model_dtype))
    n_layers = int(manifest.provenance["model"]["n_layers"])
    layers, d = tuple(range(n_layers)), manifest.d_model
    per_step = BATCH // manifest.ctx_len
    tokens = training_tokens(activations_dir(run_dir), manifest)
    batches = ContextBatches(tokens, tokens.shape[0], per_step, 0, manifest.special_token_ids)
    compute = choose_dtype(args.dtype, torch.device("cpu"))
    total_steps = args.reps + 2
    cfg = TrainConfig(
        total_steps=1000, lr=signum_sf_lr(D_SAE), warmup_steps=max(1, total_steps // 20),
        auxk_dead_tokens=10 * BATCH, compute_dtype=compute.dtype,
    )  # fmt: skip

    def batch_at(step):
        ids, ordinary = batches.contexts(step)
        return mlp_io(model, ids, layers, ordinary)

    def stacked_at(step):
        ids, ordinary = batches.contexts(step)
        return mlp_io_stacked(model, ids, layers, ordinary, scales)

    old, scales = fresh_members(batch_at(0), layers, d, cfg)
    new = stack_members(copy.deepcopy(old), cfg)
    print(
        f"threads={torch.get_num_threads()}, model {manifest.model_dtype}, SAE compute {compute.name} "
        f"({compute.reason}), {n_layers} layers, d_model {d}, d_sae {D_SAE}, k {K}, {per_step} x "
        f"{manifest.ctx_len} = {per_step * manifest.ctx_len} tokens per step"
    )
    peaks = {dt: matmul_peak(dt) for dt in (torch.float32, torch.bfloat16)}
    flops = flops_per_token(model, manifest.ctx_len, n_layers, d)
    seconds: dict[str, list[float]] = defaultdict(list)  # per step: wall and CPU (process) seconds of each part
    for step in range(args.reps):
        batch = timed(seconds, "forward", lambda s=step: batch_at(s))
        stacked_batch = timed(seconds, "forward-stacked", lambda s=step: stacked_at(s))
        timed(seconds, "per-layer SAE", lambda b=batch: per_layer_step(old, scales, b, layers, cfg))
        timed(seconds, "stacked SAE", lambda b=stacked_batch: stacked_train_step(new, b, cfg))
    step = args.reps
    tokens = per_step * manifest.ctx_len
    best_peak = max(peaks.values())
    limit = best_peak * 1e9 / flops["total"]
    print(
        "matmul peak (best of PEAK_SHAPES): "
        + ", ".join(f"{str(dt)[6:]} {g:.0f} GFLOP/s" for dt, g in peaks.items())
        + f"; FLOPs per token: forward {flops['forward'] / 1e9:.3f} G + transcoders "
        f"{flops['transcoders'] / 1e9:.3f} G = {flops['total'] / 1e9:.3f} G"
    )
    print(f"limit at the {best_peak:.0f} GFLOP/s peak: {limit:.0f} tokens/s")
    for clock in ("wall", "cpu"):
        per = {label: [v[clock] for v in values] for label, values in seconds.items()}
        runs = {
            "forward": per["forward"],
            "per-layer": [f + t for f, t in zip(per["forward"], per["per-layer SAE"], strict=True)],
            "stacked": [f + t for f, t in zip(per["forward-stacked"], per["stacked SAE"], strict=True)],
        }
        print(f"{clock} clock, median over {args.reps} steps (each path's forward + its SAE step):")
        for label, values in {**per, **runs}.items():
            median = statistics.median(values)
            rate = tokens / median
            share = f" = {rate / limit:.0%} of the limit" if label in runs else ""  # the limit counts whole steps
            print(f"  {label:16} {median:7.2f} s/step {rate:6.0f} tokens/s{share}")
        for what, new_s, old_s in (
            ("training", runs["stacked"], runs["per-layer"]),
            ("SAE step alone", per["stacked SAE"], per["per-layer SAE"]),
        ):
            ratios = [o / n for n, o in zip(new_s, old_s, strict=True)]
            print(
                f"  stacked / per-layer tokens/s, {what}: median {statistics.median(ratios):.2f}x "
                f"(per step {', '.join(f'{r:.2f}' for r in ratios)})"
            )

    rows = {
        "per-layer": profiled(lambda: batch_at(step), lambda b: per_layer_step(old, scales, b, layers, cfg)),
        "stacked": profiled(lambda: stacked_at(step), lambda b: stacked_train_step(new, b, cfg)),
    }
    step += 1
    print("one profiled step (ms): " + " ".join(f"{p:>13}" for p in ("wall", *PHASES)))
    for label, (wall, phases) in rows.items():
        print(f"  {label:10} {1e3 * wall:13.0f} " + " ".join(f"{1e3 * phases.get(p, 0.0):13.0f}" for p in PHASES))

    heldout = [batch_at(step + i) for i in range(args.heldout_batches)]
    new_members = unstack_members(*new, cfg)
    fvu_old = [statistics.mean(v) for v in zip(*[heldout_fvu(old, scales, b, layers) for b in heldout], strict=True)]
    fvu_new = [
        statistics.mean(v) for v in zip(*[heldout_fvu(new_members, scales, b, layers) for b in heldout], strict=True)
    ]
    trained = old[0][2].step
    print(f"held-out FVU after {trained} steps on the same batches (per-layer vs stacked):")
    for layer in (0, n_layers // 2, n_layers - 1):
        print(f"  layer {layer:2d}: {fvu_old[layer]:.4f} vs {fvu_new[layer]:.4f}")
    print(f"  mean over layers: {statistics.mean(fvu_old):.4f} vs {statistics.mean(fvu_new):.4f}")


if __name__ == "__main__":
    main()
