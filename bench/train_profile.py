"""Profile: where one saescope TopK training step spends its time, per phase, against the matmul peak.

For each d_sae and dtype (d_in 576, batch 4096, k 32 by default) a few warm steps of
``pipeline.sae.training.train_step`` run under torch.profiler and every op's own
time is put in one phase: encoder GEMM (the dense [N, F] pre-activation product),
encoder backward (the sparse N*K gradient), top-k, sparse decode (forward and
backward), AuxK, dtype casts, optimizer step, and the rest. A share of latents
(``--dead``) is held dead so AuxK does its work as in a long run. The machine's
matmul peak is a large square GEMM in each dtype, timed in the same run; the
encoder GEMM is also timed alone and reported as a fraction of that peak.

    python bench/train_profile.py --run runs/demo [--sizes 4608,16384] [--steps 4] [--dead 0.1]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import pipeline.sae.training as training
from pipeline.sae.initialization import init_sae, normalization_factor
from pipeline.sae.model import SaeConfig
from pipeline.sae.training import TrainConfig, TrainState, make_optimizer, train_step
from storage.shards import activations_dir, read_manifest
from storage.training_data import StreamSpec, TrainingStream, default_heldout_contexts

K, BATCH = 32, 4096
PHASES = ("encoder GEMM", "encoder bwd", "top-k", "decode", "AuxK", "casts", "optimizer", "other")


def _timed(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def matmul_peak(dtype: torch.dtype, n: int = 4096) -> float:
    """GFLOP/s of an n x n x n GEMM in ``dtype``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / _timed(lambda: a @ b, 3) / 1e9


def encoder_gemm_rate(d_in: int, d_sae: int, dtype: torch.dtype) -> float:
    """GFLOP/s of the encoder's addmm alone, as train_step runs it under autocast."""
    x, w, b = torch.randn(BATCH, d_in), torch.randn(d_sae, d_in), torch.zeros(d_sae)
    on = dtype != torch.float32

    def gemm():
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=on):
            torch.addmm(b, x, w.t())

    return 2 * BATCH * d_in * d_sae / _timed(gemm, 3) / 1e9


def _phase(event) -> str:
    names = []
    node = event
    while node is not None:
        names.append(node.name)
        node = node.cpu_parent
    joined = " | ".join(names)
    if "Optimizer.step" in joined or "_fused_adam" in joined:
        return "optimizer"
    if "auxk" in names or "MmBackward" in joined or "AddmmBackward" in joined or "IndexBackward" in joined:
        return "AuxK"
    if "_EncodeSelectedBackward" in joined:
        return "encoder bwd"
    if "EmbeddingBag" in joined or event.name.startswith(("aten::embedding_bag", "aten::_embedding_bag")):
        return "decode"
    if event.name in ("aten::addmm", "aten::mm") or (len(names) > 1 and names[1] == "aten::addmm"):
        return "encoder GEMM"  # with the bias copied into the output inside addmm
    if event.name in ("aten::copy_", "aten::_to_copy"):
        return "casts"
    if event.name == "aten::topk":
        return "top-k"
    return "other"


@contextmanager
def labelled_auxk():
    real = training.auxk_loss

    def auxk(*args, **kwargs):
        with record_function("auxk"):
            return real(*args, **kwargs)

    training.auxk_loss = auxk
    try:
        yield
    finally:
        training.auxk_loss = real


def profile_steps(batches, d_sae: int, dtype: torch.dtype, steps: int, dead: float) -> tuple[float, dict]:
    d_in = batches[0].shape[1]
    sae = init_sae(SaeConfig(d_in, d_sae, "topk", K), torch.cat(batches[:2]), seed=0)
    cfg = TrainConfig(total_steps=1000, lr=1e-3, auxk_dead_tokens=10**9, compute_dtype=dtype)
    optimizer, state = make_optimizer(sae, cfg), TrainState.fresh(d_sae)
    dead_F = torch.zeros(d_sae, dtype=torch.bool)
    dead_F[torch.randperm(d_sae, generator=torch.Generator().manual_seed(0))[: int(dead * d_sae)]] = True
    sae.train()

    def step(i):
        state.tokens_since_fired_F[dead_F] = 10**9
        train_step(sae, optimizer, batches[i % len(batches)], state, cfg)

    for i in range(2):
        step(i)
    with labelled_auxk(), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        wall = (time.perf_counter() - start) / steps
    by_phase: dict[str, float] = defaultdict(float)
    for event in prof.events():
        by_phase[_phase(event)] += event.self_cpu_time_total / 1e6 / steps
    return wall, by_phase


def load_batches(run_dir: Path, n: int) -> list[torch.Tensor]:
    folder = activations_dir(run_dir)
    manifest = read_manifest(folder)
    spec = StreamSpec(batch_size=BATCH, heldout_contexts=default_heldout_contexts(manifest.n_contexts))
    batches = []
    for x in TrainingStream(folder, manifest, spec).iter_batches():
        batches.append(x.float())
        if len(batches) == n:
            break
    scale = normalization_factor(torch.cat(batches))
    return [b * scale for b in batches]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--sizes", default="4608,16384")
    parser.add_argument("--steps", type=int, default=4, help="profiled steps per setting (after 2 warm ones)")
    parser.add_argument("--dead", type=float, default=0.1, help="fraction of latents held dead (AuxK's work)")
    args = parser.parse_args()
    torch.manual_seed(0)
    batches = load_batches(Path(args.run), 4)
    d_in = batches[0].shape[1]
    peaks = {dt: matmul_peak(dt) for dt in (torch.float32, torch.bfloat16)}
    print(f"threads={torch.get_num_threads()}, d_in {d_in}, batch {BATCH}, k {K}, {int(100 * args.dead)}% latents dead")
    print("matmul peak (4096^3 GEMM): " + ", ".join(f"{str(dt)[6:]} {g:.0f} GFLOP/s" for dt, g in peaks.items()))
    print(
        f"{'d_sae':>6} {'dtype':8} {'step ms':>8} "
        + " ".join(f"{p:>12}" for p in PHASES)
        + "  enc GEMM GFLOP/s (of peak)"
    )
    for d_sae in (int(s) for s in args.sizes.split(",")):
        for dtype in (torch.float32, torch.bfloat16):
            wall, phases = profile_steps(batches, d_sae, dtype, args.steps, args.dead)
            rate = encoder_gemm_rate(d_in, d_sae, dtype)
            cells = " ".join(f"{1e3 * phases.get(p, 0.0):9.1f} ms" for p in PHASES)
            frac = rate / peaks[dtype]
            print(f"{d_sae:6d} {str(dtype)[6:]:8} {1e3 * wall:8.1f} {cells}  {rate:.0f} ({100 * frac:.0f}%)")


if __name__ == "__main__":
    main()
