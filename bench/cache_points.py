"""Benchmark: caching many hook points from one forward, and whether transcoders should read a cache.

Measures, in one run on the default model and corpus, the same contexts each time:
  (a) the cache job with one point (resid-post at the middle block): the baseline;
  (b) the cache job with mlp-in and mlp-out at every block (what transcoders need);
  (c) reading back every point of (b) from disk, as a transcoder job on a cache would each pass;
  (d) recomputing the same 60 points with the live model (what `train --transcoder` does each step);
and the bytes per token on disk of (a) and (b).

    python bench/cache_points.py [--tokens 8192] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from jobs.cache import CacheConfig, run_cache
from jobs.console import quiet_libraries
from pipeline.lm.activations import mlp_io
from pipeline.lm.models import load_model
from storage.home import converted_models_dir
from storage.shards import activations_dir, iter_shards, read_manifest


def job(run: Path, tokens: int, batch_size: int, **points) -> tuple[float, float]:
    """(tokens/s, bytes per token on disk) of a fresh cache job."""
    cfg = CacheConfig(run=str(run), tokens=tokens, batch_size=batch_size, device="cpu", **points)
    summary = run_cache(cfg)
    size = sum(record.n_bytes for record in summary.manifest.shards)
    return summary.new_tokens / summary.seconds, size / summary.manifest.n_tokens


def read_back_rate(run: Path) -> float:
    """Tokens/s of reading (and checking) every point of every shard once."""
    folder = activations_dir(run)
    manifest = read_manifest(folder)
    start = time.perf_counter()
    for point in manifest.hook_points:
        for shard in iter_shards(folder, manifest.select(point["layer"], point["kind"])):
            shard.activations_CTD.float().sum()
    return manifest.n_tokens / (time.perf_counter() - start)


def live_rate(run: Path, batch_size: int) -> float:
    """Tokens/s of computing mlp-in and mlp-out at every block with the model, the same contexts."""
    folder = activations_dir(run)
    manifest = read_manifest(folder)
    dtype = torch.bfloat16 if manifest.model_dtype == "bfloat16" else torch.float32
    loaded = load_model(manifest.model_spec, dtype=dtype, convert_dir=converted_models_dir())
    model = loaded.model
    layers = tuple(range(loaded.info.n_layers))
    tokens_CT = torch.cat([shard.tokens_CT for shard in iter_shards(folder, manifest)])
    start = time.perf_counter()
    for first in range(0, tokens_CT.shape[0], batch_size):
        ids_BT = tokens_CT[first : first + batch_size].long()
        mlp_io(model, ids_BT, layers, torch.ones_like(ids_BT, dtype=torch.bool))
    return tokens_CT.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        rate_a, bytes_a = job(Path(tmp) / "one", args.tokens, args.batch_size)
        rate_b, bytes_b = job(Path(tmp) / "all", args.tokens, args.batch_size, hooks="mlp-in,mlp-out", layers="all")
        rate_c = read_back_rate(Path(tmp) / "all")
        rate_d = live_rate(Path(tmp) / "all", args.batch_size)
        dtype = read_manifest(activations_dir(Path(tmp) / "all")).model_dtype
    print(f"{args.tokens} tokens of the default corpus, batch {args.batch_size}, model dtype {dtype}")
    print(f"(a) cache, 1 point (resid-post, middle block): {rate_a:8.0f} tokens/s  {bytes_a:9,.0f} B/token")
    print(f"(b) cache, mlp-in + mlp-out at all 30 blocks:  {rate_b:8.0f} tokens/s  {bytes_b:9,.0f} B/token")
    print(f"(c) read back all 60 points of (b):             {rate_c:8.0f} tokens/s")
    print(f"(d) recompute the 60 points, live model:        {rate_d:8.0f} tokens/s")
    print(f"ratio b/a (60 points / 1 point, job speed):    {rate_b / rate_a:.3f}")
    print(f"ratio c/d (read a cache / recompute per pass): {rate_c / rate_d:.3f}")
    print(f"disk for 1M tokens of (b): {bytes_b * 1e6 / 2**30:.0f} GiB")


if __name__ == "__main__":
    main()
