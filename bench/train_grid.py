"""Benchmark: a grid of SAEs trained in one job against the same SAEs trained one after another.

On a private copy of a run's activation cache (its SAEs are not copied), trains
(a) the whole grid with one `run_grid` call, then (b) every member alone with
`run_train` under the name ``alone-<member>``, with the same options. Prints both
wall times, their ratio, and where each side's time went, from timers wrapped
around the stream (reading, checksums, decoding, masking, shuffling, the per-batch
gather), the SAE steps, the held-out evaluation and the dtype measurement.
Finally checks that one grid member equals its lone twin tensor for tensor.

    python bench/train_grid.py --run runs/demo --k 16,32,64 --expansion 4,8 --tokens 400000
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

import jobs.train as train
import pipeline.sae.training as training
from jobs.console import quiet_libraries, tune_allocator
from jobs.training.config import grid_members
from jobs.training.values import listed
from storage.training_data import TrainingStream

SPENT: dict[str, float] = defaultdict(float)


def timed(name: str, function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start

    return wrapper


def timed_stream(iter_batches):
    def wrapper(*args, **kwargs):
        batches = iter_batches(*args, **kwargs)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            SPENT["data: read, decode, shuffle, gather"] += time.perf_counter() - start
            if batch is None:
                return
            yield batch

    return wrapper


def install_timers() -> None:
    TrainingStream.iter_batches = timed_stream(TrainingStream.iter_batches)
    training.train_step = timed("SAE steps", training.train_step)
    train.evaluate = timed("held-out evaluation", train.evaluate)
    train.agreed_dtype = timed("dtype measurement", train.agreed_dtype)


def side(label: str, work) -> dict[str, float]:
    SPENT.clear()
    start = time.perf_counter()
    work()
    wall = time.perf_counter() - start
    spent = dict(SPENT)
    spent["other (init, checkpoints, writing)"] = wall - sum(spent.values())
    print(f"{label}: {wall:.1f}s wall")
    for name, seconds in spent.items():
        print(f"  {name:40s} {seconds:7.1f}s  {100 * seconds / wall:5.1f}%")
    return {"wall": wall, **spent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="run whose activation cache is copied")
    parser.add_argument("--k", type=listed(int), default=(16, 32, 64))
    parser.add_argument("--expansion", type=listed(int), default=(4, 8))
    parser.add_argument("--arch", default="topk")
    parser.add_argument("--tokens", type=int, default=400_000)
    parser.add_argument("--lm-eval-contexts", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    quiet_libraries()
    tune_allocator()
    with tempfile.TemporaryDirectory(prefix="grid-bench-") as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(Path(args.run) / "activations", run / "activations")
        cfg = train.TrainJobConfig(
            run=str(run), k=args.k, expansion=args.expansion, arch=args.arch, tokens=args.tokens,
            lm_eval_contexts=args.lm_eval_contexts, dtype=args.dtype, device="cpu",
        )  # fmt: skip
        members = grid_members(cfg)
        install_timers()
        print(f"{len(members)} SAEs: {', '.join(m.name for m in members)}; {args.tokens} tokens each")
        grid = side("grid, one job", lambda: train.run_grid(cfg))
        alone = side(
            "one after another",
            lambda: [train.run_train(dataclasses.replace(m, name=f"alone-{m.name}")) for m in members],
        )
        print(f"ratio (one after another / grid): {alone['wall'] / grid['wall']:.2f}x")
        a = load_file(run / "saes" / members[0].name / "sae_weights.safetensors")
        b = load_file(run / "saes" / f"alone-{members[0].name}" / "sae_weights.safetensors")
        same = all(torch.equal(a[key], b[key]) for key in a)
        print(f"{members[0].name} from the grid equals it trained alone: {same}")


if __name__ == "__main__":
    main()
