"""Benchmark: generation tokens/s with and without a steering hook, in one run.

Greedy generation on the default model from the same prompt; runs alternate
(plain, steered, plain, steered, ...) so machine drift hits both alike. The
steering hook encodes every new position with the SAE and adds the edit.

    python bench/steer_overhead.py --run runs/demo [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from jobs.console import quiet_libraries, tune_allocator
from jobs.run import cache_hook_point, load_run_model, read_sae
from pipeline.steering.edit import FeatureSteer, SteeringSpec, steer
from pipeline.steering.generation import SamplingConfig, sample
from storage.sae_store import resolve_sae
from storage.shards import activations_dir, read_manifest

PROMPT = "The documentation of the standard library explains how to"


def timed(fn) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--feature", type=int, default=0)
    args = parser.parse_args()
    quiet_libraries()
    tune_allocator()
    run = Path(args.run)
    manifest = read_manifest(activations_dir(run))
    loaded = load_run_model(manifest, torch.device("cpu"))
    sae, _ = read_sae(resolve_sae(run, None))
    point = cache_hook_point(manifest)
    prompt = [loaded.tokenizer.bos_token_id, *loaded.tokenizer(PROMPT, add_special_tokens=False).input_ids]
    cfg = SamplingConfig(max_new_tokens=args.tokens, temperature=0.0)
    spec = SteeringSpec((FeatureSteer(args.feature, "clamp", 10.0),), prompt_len=len(prompt))

    def plain():
        return sample(loaded.model, prompt, cfg, eos_id=None)

    def steered():
        with steer(loaded.model, sae, point, spec):
            return sample(loaded.model, prompt, cfg, eos_id=None)

    plain(), steered()  # warm-up
    plain_s = steered_s = 0.0
    n_plain = n_steered = 0
    for _ in range(args.repeats):
        seconds, out = timed(plain)
        plain_s, n_plain = plain_s + seconds, n_plain + len(out)
        seconds, out = timed(steered)
        steered_s, n_steered = steered_s + seconds, n_steered + len(out)
    plain_rate, steered_rate = n_plain / plain_s, n_steered / steered_s
    print(
        f"model {manifest.provenance['model']['name']}, SAE d_sae {sae.cfg.d_sae}, hook {point.name}, "
        f"{args.tokens} new tokens x {args.repeats} repeats, greedy, threads {torch.get_num_threads()}"
    )
    print(f"plain generation:   {plain_rate:7.1f} tokens/s")
    print(f"steered generation: {steered_rate:7.1f} tokens/s")
    overhead = 100 * (1 - steered_rate / plain_rate)
    print(f"ratio steered/plain tokens/s: {steered_rate / plain_rate:.3f}  (overhead {overhead:.1f}%, target < 10%)")


if __name__ == "__main__":
    main()
