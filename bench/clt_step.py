"""Benchmark: one cross-layer transcoder training step on random data, and its memory.

Builds a CLT over every layer of SmolLM2-135M's shape (L=30, D=576) at the given width,
takes a few ``clt_train_step``s on random normalized batches (the first is a warm-up and
allocates the optimizer state), and prints seconds per step, split into the forward +
backward and the optimizer + decoder-norm part, with the peak resident memory next to
``cross_layer.training_bytes``'s estimate.

    python bench/clt_step.py [--width 2304] [--batch 1024] [--steps 3] [--optimizer signum-sf] [--device cpu]

Measured (2026-12-07, a shared 2-core CPU at load ~7, ``--threads 1``, F=2304, signum-sf):
24-28 s per step after the first (47 s, which allocates the optimizer state), 13.1 GiB
peak resident. Profile of one step (33 s): the optimizer's sign 22%, the decoders'
embedding_bag forward 18%, its per-sample-weight backward 16% and weight backward 18%,
the parallel-gradient projection 7%, the encoders' matmuls 5%.

On a loaded CPU (more runnable threads than cores) torch's parallel sort, which the
sparse backward kernels call, can take ~250 ms for 32k entries instead of ~0.5 ms:
compare ``--threads 1``.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from pipeline.sae.cross_layer import CltConfig, CrossLayerTranscoder, decoder_parameters, training_bytes
from pipeline.sae.cross_layer_training import CltTrainState, clt_train_step, make_clt_optimizer
from pipeline.sae.training import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--width", type=int, default=2304)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--arch", default="topk")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--optimizer", default="signum-sf")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = CltConfig(args.layers, args.d_model, args.width, args.arch, k=args.k)
    clt = CrossLayerTranscoder(cfg, device=device).initialize(torch.Generator().manual_seed(0), 0.5)
    tcfg = TrainConfig(total_steps=args.steps + 1, lr=1e-3, optimizer=args.optimizer)
    opt, state = make_clt_optimizer(clt, tcfg), CltTrainState.fresh(clt)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.layers, args.batch, args.d_model)
    x = torch.randn(shape, generator=gen, device=device)
    y = torch.randn(shape, generator=gen, device=device)
    clt.train()
    times = []
    for step in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        stats = clt_train_step(clt, opt, x, y, state, tcfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        print(f"step {step}: {times[-1]:.2f} s (loss {stats.loss:.1f}, l0 {stats.l0:.1f})")
    steady = sorted(times[1:])[len(times[1:]) // 2]
    where = f"{device} ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)
    print(f"L={args.layers} D={args.d_model} F={args.width} k={args.k} batch={args.batch} {args.optimizer} on {where}")
    print(f"decoder params {decoder_parameters(args.layers, args.d_model, args.width) / 1e9:.2f} B")
    print(f"median step {steady:.2f} s ({args.batch / steady:.0f} tokens/s)")
    estimate = training_bytes(args.layers, args.d_model, args.width, args.batch) / 2**30
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (estimate {estimate:.1f} GiB)")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"peak resident memory {peak:.1f} GiB (estimate {estimate:.1f} GiB)")


if __name__ == "__main__":
    main()
