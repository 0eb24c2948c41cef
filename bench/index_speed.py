"""Benchmark: feature-index build speed and memory, and feature-page query latency.

Scale part (synthetic, stated): the default corpus holds ~450k tokens and caching
1M real tokens takes ~15 minutes on 2 cores, so sparse codes for 1M tokens x 16k
features (k=32, Zipf-like feature frequencies, exponential activation values)
are synthesized and fed to the same accumulator and DuckDB builder the index job
uses. In one run it prints:
  * the index build's tokens/s (everything after encoding) next to the tokens/s of
    encoding with a 16k-latent TopK SAE alone, and their ratio;
  * peak memory of builds at two token counts (each in its own process);
  * p50/p95 latency of every query a feature page makes, on the 1M-token index.

    python bench/index_speed.py [--tokens 1000000] [--small-tokens 250000] [--features 16384]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from jobs.console import tune_allocator
from pipeline.features.decoder_geometry import logit_effect_rankings, nearest_by_decoder
from pipeline.features.statistics import CodeBatch, FeatureAccumulator
from pipeline.sae.model import Sae, SaeConfig
from storage.index_builder import IndexBuilder
from storage.index_queries import FeatureIndex

D_MODEL, K, CTX_LEN, VOCAB, BATCH_CONTEXTS = 576, 32, 128, 49152, 32


def synthetic_batches(n_tokens: int, n_features: int, seed: int = 0):
    """(context ids [C], tokens [C, T], CodeBatch) like the index job's encoder would produce."""
    g = torch.Generator().manual_seed(seed)
    popularity = 1.0 / torch.arange(1, n_features + 1, dtype=torch.float64) ** 0.8
    popularity = popularity[torch.randperm(n_features, generator=g)]
    n_contexts = n_tokens // CTX_LEN
    for start in range(0, n_contexts, BATCH_CONTEXTS):
        contexts = torch.arange(start, min(start + BATCH_CONTEXTS, n_contexts))
        n = len(contexts) * CTX_LEN
        idx = torch.multinomial(popularity.float(), K * n, replacement=True, generator=g).reshape(n, K)
        acts = torch.empty(n, K).exponential_(generator=g)
        tokens = torch.randint(0, VOCAB, (len(contexts), CTX_LEN), generator=g)
        codes = CodeBatch.from_codes(acts, idx, contexts.repeat_interleave(CTX_LEN), torch.arange(n) % CTX_LEN)
        yield contexts, tokens, codes


def build(folder: Path, n_tokens: int, n_features: int) -> dict:
    """Build a synthetic index; return timings and this process's peak memory."""
    started = time.perf_counter()
    acc = FeatureAccumulator(n_features, 20)
    g = torch.Generator().manual_seed(1)
    W_dec = torch.nn.functional.normalize(torch.randn(n_features, D_MODEL, generator=g), dim=1)
    W_U = torch.randn(VOCAB, D_MODEL, generator=g)
    with IndexBuilder(folder, memory_limit="1GB", threads=torch.get_num_threads()) as builder:
        for contexts, tokens, codes in synthetic_batches(n_tokens, n_features):
            acc.update(codes, tokens.numel())
            builder.add_codes(codes.feature, codes.context, codes.position, codes.value)
            builder.add_contexts(contexts, tokens)
        streamed = time.perf_counter()
        builder.write_features(acc.count_F, acc.density_F(), acc.max_F, acc.mean_F())
        builder.write_top_examples(acc.top_value_FK, acc.top_context_FK, acc.top_position_FK)
        geometry_start = time.perf_counter()
        raw, standardized = logit_effect_rankings(W_dec, W_U, None)
        builder.write_logit_effects(*raw)
        builder.write_standardized_effects(standardized)
        builder.write_neighbours(*nearest_by_decoder(W_dec))
        geometry = time.perf_counter() - geometry_start
        builder.write_vocab([f"tok{i}" for i in range(VOCAB)])
        builder.write_metadata({"synthetic": True, "tokens_indexed": n_tokens})
        builder.finish(CTX_LEN, window=16)
    total = time.perf_counter() - started
    return {
        "tokens": n_tokens,
        "stream_seconds": streamed - started,
        "geometry_seconds": geometry,
        "build_seconds_without_geometry": total - geometry,
        "total_seconds": total,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def build_in_subprocess(folder: Path, n_tokens: int, n_features: int) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import index_speed as b; "
        f"b.tune_allocator(); print(json.dumps(b.build(b.Path({str(folder)!r}), {n_tokens}, {n_features})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"build of {n_tokens} tokens failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def encoder_rate(n_features: int, n_tokens: int = 32768) -> float:
    """Tokens/s of encoding with a TopK SAE alone (matmul + top-k), the baseline cost of any index."""
    sae = Sae(SaeConfig(D_MODEL, n_features, "topk", K)).initialize(torch.Generator().manual_seed(0)).eval()
    x = torch.randn(n_tokens, D_MODEL)
    sae.encode_sparse(x[:4096])
    start = time.perf_counter()
    for chunk in x.split(BATCH_CONTEXTS * CTX_LEN):
        sae.encode_sparse(chunk)
    return n_tokens / (time.perf_counter() - start)


def query_latencies(path: Path, n_features: int, repeats: int = 200) -> dict[str, tuple[float, float]]:
    g = torch.Generator().manual_seed(2)
    features = torch.randint(0, n_features, (repeats,), generator=g).tolist()
    queries = {
        "summary": lambda index, f: index.summary(f),
        "top_examples": lambda index, f: index.top_examples(f),
        "interval_examples(quantile)": lambda index, f: index.interval_examples(f, "quantile"),
        "interval_examples(width)": lambda index, f: index.interval_examples(f, "width"),
        "list_features(page)": lambda index, f: index.list_features(sort="max", limit=50, offset=f % 1000),
        "search_tokens": lambda index, f: index.search_tokens(f"tok{f}"),
    }
    results = {}
    with FeatureIndex(path) as index:
        for name, query in queries.items():
            query(index, features[0])
            times = []
            for f in features:
                start = time.perf_counter()
                query(index, f)
                times.append(1000 * (time.perf_counter() - start))
            times.sort()
            results[name] = (statistics.median(times), times[int(0.95 * (len(times) - 1))])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--small-tokens", type=int, default=250_000)
    parser.add_argument("--features", type=int, default=16384)
    args = parser.parse_args()
    tune_allocator()
    with tempfile.TemporaryDirectory() as tmp:
        small = build_in_subprocess(Path(tmp) / "small", args.small_tokens, args.features)
        large = build_in_subprocess(Path(tmp) / "large", args.tokens, args.features)
        encode = encoder_rate(args.features)
        latencies = query_latencies(Path(tmp) / "large" / "features.duckdb", args.features)
        size = (Path(tmp) / "large" / "features.duckdb").stat().st_size / 2**20
    print(
        f"synthetic sparse codes: {args.features} features, k={K}, ctx_len {CTX_LEN}, threads {torch.get_num_threads()}"
    )
    for result in (small, large):
        rate = result["tokens"] / result["build_seconds_without_geometry"]
        print(
            f"build {result['tokens']:>9,} tokens: {result['build_seconds_without_geometry']:6.1f}s "
            f"({rate:,.0f} tokens/s; streaming part {result['stream_seconds']:.1f}s), logit effects + neighbours "
            f"{result['geometry_seconds']:.1f}s, peak memory {result['peak_rss_mib']:.0f} MiB"
        )
    large_rate = large["tokens"] / large["build_seconds_without_geometry"]
    print(f"encoding alone with a {args.features}-latent TopK SAE: {encode:,.0f} tokens/s")
    print(
        f"ratio index build / encoding tokens/s: {large_rate / encode:.2f} "
        f"(a full build encodes and indexes: {1 / (1 / encode + 1 / large_rate):,.0f} tokens/s, "
        f"{encode / (1 / (1 / encode + 1 / large_rate)):.2f}x the time of encoding alone)"
    )
    print(
        f"ratio peak memory {args.tokens:,} / {args.small_tokens:,} tokens: "
        f"{large['peak_rss_mib'] / small['peak_rss_mib']:.2f}"
    )
    print(f"index file: {size:.0f} MiB")
    for name, (p50, p95) in latencies.items():
        print(f"query {name:30s} p50 {p50:6.2f} ms   p95 {p95:6.2f} ms   (target p95 < 20 ms)")


if __name__ == "__main__":
    main()
