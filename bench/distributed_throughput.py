"""Benchmark: cache and training tokens/s at 1 and 2 processes (torchrun, gloo), in one run.

On the default model and corpus, on CPU:
  (a) `saescope cache` as one process (all cores), then under
      `torchrun --standalone --nproc-per-node 2` (torchrun gives each rank one
      OpenMP thread unless OMP_NUM_THREADS is set); the job's own tokens/s
      (model loading excluded) and the wall time of the whole command;
  (b) `saescope train` on the one-process cache, same options, 1 then 2 processes;
      the training tokens/s the job records (evaluation excluded);
and checks that the two caches hold the same contexts and the two SAEs agree.
Prints the 2-proc / 1-proc ratios. On a 2-core machine expect little: the
single process already uses both cores.

    python bench/distributed_throughput.py [--tokens 65536] [--train-tokens 409600] [--d-sae 4608]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from storage.shards import iter_shards, read_manifest

SAESCOPE = str(Path(sys.executable).with_name("saescope"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--"]


def run(args: list[str], two: bool) -> tuple[str, float]:
    start = time.perf_counter()
    done = subprocess.run([*(TORCHRUN if two else []), SAESCOPE, *args], capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(done.stdout + done.stderr)
    return done.stdout, time.perf_counter() - start


def cache_rate(stdout: str) -> float:
    return float(re.search(r"\(([\d,]+) tokens/s\)", stdout).group(1).replace(",", ""))


def contexts(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    folder = run_dir / "activations"
    shards = list(iter_shards(folder, read_manifest(folder)))
    return torch.cat([s.tokens_CT for s in shards]), torch.cat([s.activations_CTD for s in shards])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--train-tokens", type=int, default=409600)
    parser.add_argument("--d-sae", type=int, default=4608)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "one", Path(tmp) / "two"
        cache = ["cache", "--tokens", str(args.tokens), "--model-dtype", "float32", "--device", "cpu"]
        out1, wall1 = run([*cache, "--run", str(one)], two=False)
        out2, wall2 = run([*cache, "--run", str(two)], two=True)
        (t1, a1), (t2, a2) = contexts(one), contexts(two)
        same = torch.equal(t1, t2)
        max_diff = (a1.float() - a2.float()).abs().max().item()
        train = ["train", "--run", str(one), "--d-sae", str(args.d_sae), "--tokens", str(args.train_tokens)]
        train += ["--dtype", "float32", "--device", "cpu", "--lm-eval-contexts", "0"]
        rates, walls, fvus = [], [], []
        for name, parallel in (("one", False), ("two", True)):
            _, wall = run([*train, "--name", name], two=parallel)
            metrics = json.loads((one / "saes" / name / "metrics.json").read_text())
            rates.append(metrics["training_tokens_per_second"])
            fvus.append(metrics["fvu"])
            walls.append(wall)
        w1, w2 = (
            load_file(one / "saes/one/sae_weights.safetensors"),
            load_file(one / "saes/two/sae_weights.safetensors"),
        )
        weight_diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    c1, c2 = cache_rate(out1), cache_rate(out2)
    print(f"cache {args.tokens} tokens of the default model, float32, CPU ({torch.get_num_threads()} cores seen)")
    print(f"  1 process : {c1:8.0f} tokens/s   command {wall1:6.1f} s")
    print(f"  2 ranks   : {c2:8.0f} tokens/s   command {wall2:6.1f} s")
    print(f"  ratio 2/1 : {c2 / c1:.2f} (job)   {wall1 / wall2:.2f} (command)")
    print(f"  same contexts: {same}; max |activation difference| {max_diff:.2e} (thread counts differ)")
    print(f"train d_sae {args.d_sae}, k 32, batch 4096, {args.train_tokens} tokens, float32")
    print(f"  1 process : {rates[0]:8.0f} tokens/s   command {walls[0]:6.1f} s")
    print(f"  2 ranks   : {rates[1]:8.0f} tokens/s   command {walls[1]:6.1f} s")
    print(f"  ratio 2/1 : {rates[1] / rates[0]:.2f} (job)   {walls[0] / walls[1]:.2f} (command)")
    print(f"  held-out FVU: 1 process {fvus[0]:.4f}, 2 ranks {fvus[1]:.4f} ({100 * (fvus[1] / fvus[0] - 1):+.2f}%)")
    print(f"  max |weight difference| between the two SAEs: {weight_diff:.2e} (thread counts differ: 2 vs 1 per rank)")


if __name__ == "__main__":
    main()
