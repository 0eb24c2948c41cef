"""Benchmark: tokens/s of the cache job against the bare truncated forward pass, same contexts.

Measures, in one run on the default model and corpus:
  (a) the bare truncated forward pass in float32 (what a user of other tools gets),
      timed before and after the jobs and averaged to cancel drift;
  (b) the full cache job in float32 (tokenizing, forward, fp16 conversion, hashing, writing);
  (c) the full cache job with --model-dtype auto;
  (d) the bare forward in bfloat16 on a few contexts, to show what auto decided from;
and the agreement of (c)'s stored activations with (a) on non-special positions.

    python bench/cache_throughput.py [--tokens 65536] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from jobs.cache import CacheConfig, run_cache
from jobs.console import quiet_libraries
from pipeline.lm.activations import compute_activations
from pipeline.lm.corpus import CorpusSpec, iter_documents
from pipeline.lm.models import load_model
from pipeline.lm.packing import SpecialTokens, pack_contexts, special_mask
from storage.home import converted_models_dir
from storage.shards import activations_dir, iter_shards, read_manifest


def bare_forward_rate(model, tokens_CT, layer, batch_size) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    acts = compute_activations(model, tokens_CT, layer, batch_size)
    return tokens_CT.numel() / (time.perf_counter() - start), acts


def job_rate(run_dir: Path, tokens: int, batch_size: int, model_dtype: str) -> float:
    cfg = CacheConfig(run=str(run_dir), tokens=tokens, batch_size=batch_size, model_dtype=model_dtype, device="cpu")
    summary = run_cache(cfg)
    return summary.new_tokens / summary.seconds


def stored_activations(run_dir: Path) -> torch.Tensor:
    folder = activations_dir(run_dir)
    manifest = read_manifest(folder)
    return torch.cat([shard.activations_CTD.float() for shard in iter_shards(folder, manifest)])


def agreement(reference_CTD, candidate_CTD, mask_CT) -> tuple[float, float]:
    ref, cand = reference_CTD[~mask_CT], candidate_CTD[~mask_CT]
    cosine = torch.nn.functional.cosine_similarity(ref, cand, dim=-1).mean().item()
    relative = ((ref - cand).norm() / ref.norm()).item()
    return cosine, relative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layer", type=int, default=15)
    args = parser.parse_args()
    quiet_libraries()
    torch.manual_seed(0)
    loaded = load_model("default", convert_dir=converted_models_dir())
    n_ctx = args.tokens // 128
    contexts = list(islice(pack_contexts(iter_documents(CorpusSpec()), loaded.tokenizer, 128), n_ctx))
    tokens_CT = torch.tensor(contexts, dtype=torch.int32)
    mask_CT = special_mask(tokens_CT, SpecialTokens.from_tokenizer(loaded.tokenizer).special_ids)
    compute_activations(loaded.model, tokens_CT[:2], args.layer, 2)  # warm-up

    rate_a1, acts_a = bare_forward_rate(loaded.model, tokens_CT, args.layer, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        rate_b = job_rate(Path(tmp) / "fp32", n_ctx * 128, args.batch_size, "float32")
        rate_c = job_rate(Path(tmp) / "auto", n_ctx * 128, args.batch_size, "auto")
        auto_dtype = read_manifest(activations_dir(Path(tmp) / "auto")).provenance["model_dtype"]
        acts_c = stored_activations(Path(tmp) / "auto")
    rate_a2, _ = bare_forward_rate(loaded.model, tokens_CT, args.layer, args.batch_size)
    rate_a = (rate_a1 + rate_a2) / 2
    few = tokens_CT[: max(4, n_ctx // 16)]
    rate_d, _ = bare_forward_rate(loaded.model.to(torch.bfloat16), few, args.layer, args.batch_size)
    cosine, relative = agreement(acts_a, acts_c, mask_CT)

    print(f"contexts: {n_ctx} x 128 tokens of the default corpus, layer {args.layer}, batch {args.batch_size}")
    print(f"(a) bare truncated forward, float32:  {rate_a:8.0f} tokens/s  (runs: {rate_a1:.0f}, {rate_a2:.0f})")
    print(f"(b) cache job, float32:               {rate_b:8.0f} tokens/s")
    print(
        f"(c) cache job, model-dtype auto:      {rate_c:8.0f} tokens/s  (auto chose {auto_dtype['name']}: "
        f"{auto_dtype['reason']}; GFLOP/s {auto_dtype['gflops']})"
    )
    print(f"(d) bare truncated forward, bfloat16: {rate_d:8.0f} tokens/s  ({few.shape[0]} contexts)")
    print(f"ratio b/a (job fp32 / bare fp32): {rate_b / rate_a:.3f}   target >= 0.95")
    print(f"ratio c/a (job auto / bare fp32): {rate_c / rate_a:.3f}   target >= 2.0 where bf16 is fast")
    print(f"ratio d/a (bare bf16 / bare fp32): {rate_d / rate_a:.3f}")
    print(f"agreement of (c) with (a): mean cosine {cosine:.6f}, relative error {relative:.2e}")


if __name__ == "__main__":
    main()
