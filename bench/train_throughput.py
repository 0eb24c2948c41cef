"""Benchmark: saescope's TopK trainer against a plain dense PyTorch TopK reference (and sparsify).

On the same cached activations, in one run, for each d_sae and dtype: training
tokens/s of every trainer, and the held-out FVU each reaches after the same
tokens. Steps of the trainers are interleaved (one step of each in turn), so
drifts in machine speed affect all of them alike.

Trainers:
  saescope  pipeline.sae.initialization + pipeline.sae.training with their defaults (sparse TopK kernels,
            geometric-median b_dec, encoder at 0.5x the decoder, AuxK, auto learning rate)
  dense     a plain PyTorch TopK SAE written below: dense decode, Adam at
            2e-4/sqrt(d_sae/2^14), mean-initialized b_dec, unit-norm decoder
  sparsify  EleutherAI sparsify's SparseCoder with its default optimizer (signum +
            schedule-free), only if `eai-sparsify` is installed (never a dependency)

    python bench/train_throughput.py --run runs/demo [--epochs 1] [--sizes 4608,16384] [--bf16-steps 3]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from jobs.console import tune_allocator
from pipeline.evaluation.reconstruction import ReconstructionStats
from pipeline.sae.initialization import init_sae, normalization_factor
from pipeline.sae.model import SaeConfig
from pipeline.sae.schedule import auto_lr, default_lr, default_warmup_steps
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


def saescope_runner(d_in, d_sae, sample, total_steps, dtype):
    sae = init_sae(SaeConfig(d_in, d_sae, "topk", K), sample, seed=0)
    lr = auto_lr(d_sae, total_steps)
    cfg = TrainConfig(
        total_steps=total_steps,
        lr=lr,
        warmup_steps=default_warmup_steps(total_steps),
        auxk_dead_tokens=default_auxk_dead_tokens(total_steps * BATCH, BATCH),
        compute_dtype=dtype,
    )
    optimizer, state = make_optimizer(sae, cfg), TrainState.fresh(d_sae)
    sae.train()
    return Runner("saescope", lambda x: train_step(sae, optimizer, x, state, cfg), lambda x: sae.reconstruct(x))


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


def sparsify_runner(d_in, d_sae, sample, total_steps, dtype):
    """EleutherAI sparsify with its default optimizer, driven the way its Trainer does."""
    try:
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.sign_sgd import SignSGD
    except ImportError:
        return None
    coder = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=K), device="cpu", dtype=torch.float32)
    coder.b_dec.data = sample.mean(0)
    optimizer = ScheduleFreeWrapper(
        SignSGD([{"params": coder.parameters(), "lr": 5e-3 / math.sqrt(d_sae / 2**14)}]), momentum=0.95
    )
    optimizer.train()
    since_fired = torch.zeros(d_sae, dtype=torch.long)

    def step(x):
        coder.set_decoder_norm_to_unit_norm()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = coder(x, dead_mask=since_fired > 10_000_000)
        since_fired.add_(x.shape[0])
        since_fired[out.latent_indices.flatten()] = 0
        (out.fvu + out.auxk_loss / 32).backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()

    def reconstruct(x):
        optimizer.eval()
        result = coder(x).sae_out
        optimizer.train()
        return result

    return Runner("sparsify", step, reconstruct)


@torch.no_grad()
def heldout_fvu(runner, heldout_ND):
    stats = ReconstructionStats(heldout_ND.shape[1], 1)
    for x in heldout_ND.split(BATCH):
        stats.update(x, runner.reconstruct(x).float(), torch.zeros(x.shape[0]), torch.zeros(1, dtype=torch.bool))
    return stats.result().fvu


def load_data(run_dir: Path, epochs: float):
    folder = activations_dir(run_dir)
    manifest = read_manifest(folder)
    heldout = default_heldout_contexts(manifest.n_contexts)
    stream = TrainingStream(folder, manifest, StreamSpec(batch_size=BATCH, heldout_contexts=heldout))
    steps = max(1, round(stream.batches_per_epoch() * epochs))
    batches = []
    for x in stream.iter_batches():
        batches.append(x)
        if len(batches) == min(steps, stream.batches_per_epoch()):
            break
    scale = normalization_factor(torch.cat(batches[:4]))
    special = torch.tensor(manifest.special_token_ids)
    held = [a[~torch.isin(t, special)] for a, t in iter_heldout(folder, manifest, heldout)]
    return [b * scale for b in batches], torch.cat(held).float() * scale, steps, manifest.d_model


def compare(batches, heldout, steps, d_in, d_sae, dtype, with_fvu):
    sample = torch.cat(batches[:4])
    makers = (saescope_runner, dense_runner, sparsify_runner)
    runners = [r for r in (make(d_in, d_sae, sample, steps, dtype) for make in makers) if r is not None]
    for i in range(steps):
        x = batches[i % len(batches)]
        for runner in runners:
            runner.step(x)
    return {r.name: (r.tokens / r.seconds, heldout_fvu(r, heldout) if with_fvu else None) for r in runners}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="run with an activation cache (make demo builds runs/demo)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the cache for the fp32 comparison")
    parser.add_argument("--sizes", default="4608,16384", help="d_sae values")
    parser.add_argument("--bf16-steps", type=int, default=3, help="steps for the bf16 throughput runs (0: skip)")
    args = parser.parse_args()
    tune_allocator()
    torch.manual_seed(0)
    batches, heldout, steps, d_in = load_data(Path(args.run), args.epochs)
    print(
        f"data: {args.run}, {len(batches)} training batches of {BATCH} tokens, {heldout.shape[0]} held-out tokens; "
        f"k={K}, {steps} steps per fp32 run, threads={torch.get_num_threads()}"
    )
    for d_sae in (int(s) for s in args.sizes.split(",")):
        runs = [("float32", torch.float32, steps, True)]
        if args.bf16_steps:
            runs.append(("bfloat16", torch.bfloat16, args.bf16_steps, False))
        for name, dtype, n_steps, with_fvu in runs:
            results = compare(batches, heldout, n_steps, d_in, d_sae, dtype, with_fvu)
            base_rate, base_fvu = results["dense"]
            for trainer, (rate, fvu) in results.items():
                fvu_text = f"FVU {fvu:.4f}" if fvu is not None else "FVU n/a (throughput only)"
                print(f"d_sae {d_sae:6d} {name:8s} {trainer:9s} {rate:9.0f} tokens/s  {fvu_text}")
            for trainer, (rate, fvu) in results.items():
                if trainer != "dense":
                    extra = f", FVU {fvu:.4f} vs dense {base_fvu:.4f}" if fvu is not None else ""
                    print(f"ratio {trainer}/dense tokens/s at d_sae {d_sae} {name}: {rate / base_rate:.2f}{extra}")


if __name__ == "__main__":
    main()
