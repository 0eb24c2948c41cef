"""The trace estimate beside what tracing measures: peak memory and time for prompts of a few lengths.

For each length, a fresh Python process (so one prompt's peak cannot hide another's) loads the
run's tokenizer, cuts a fixed English text to that many tokens, and runs `saescope trace`'s own
code (``jobs.trace.run_trace``, graph name ``bench-trace-memory-T``, removed afterwards). It
reports the estimate (``pipeline.tracing.estimate``) and the measured peak resident memory
(``resource.getrusage`` ru_maxrss; the process's peak after its imports is subtracted, since the
estimate counts what tracing adds: model, transcoders, graph) and the tracing time (record,
attribution and labels; model loading excluded, as in the estimate).

    PYTHONPATH=$PWD python bench/trace_memory.py --run runs/NAME [--tokens 8,32,64] [--label-contexts 16]

On a CPU other jobs share, set OMP_NUM_THREADS=1: with 2 threads on an overloaded 2-core machine a
tiny model's backward pass took 0.3-0.8 s instead of 0.06 s (threads waiting on each other), which
says nothing about tracing. Tiny run, 1 thread, load ~8 on 2 cores (2026-12-07): peak estimate /
measured 1.39, 1.24, 0.98 and time 0.62, 0.67, 0.42 for 8, 32 and 64 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange grain, "
    "salt and cloth. Over the centuries the market grew into a town, and the town into a capital whose libraries, "
    "bridges and schools drew scholars from distant countries. "
)
NAME = "bench-trace-memory-{}"


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def prompt_of(tokenizer, n_tokens: int) -> str:
    """A text the tokenizer encodes to about ``n_tokens`` tokens with BOS (the trace prepends it)."""
    ids = tokenizer(TEXT * (1 + n_tokens // 20), add_special_tokens=False).input_ids[: n_tokens - 1]
    return tokenizer.decode(ids)


def child(args) -> dict:
    """One trace in this process; the measurements as a dict."""
    import jobs.trace as job
    from jobs.console import quiet_libraries
    from pipeline.lm.token_text import load_tokenizer
    from storage.graph_groups import remove_graph
    from storage.home import converted_models_dir
    from storage.shards import activations_dir, read_manifest

    quiet_libraries()
    manifest = read_manifest(activations_dir(Path(args.run)))
    prompt = prompt_of(load_tokenizer(manifest.model_spec, converted_models_dir()), args.child)
    name = NAME.format(args.child)
    cfg = job.TraceConfig(run=args.run, prompt=prompt, name=name, force=True, label_contexts=args.label_contexts,
                          device=args.device, max_feature_nodes=args.max_feature_nodes,
                          transcoders=args.transcoders)  # fmt: skip
    before = _rss_bytes()
    started = time.perf_counter()
    result = job.run_trace(cfg, say=lambda _line: None)
    wall = time.perf_counter() - started
    remove_graph(Path(args.run), name)
    timings, est = result["document"]["saescope"]["timings"], result["document"]["saescope"]["estimate"]
    return {
        "tokens": result["summary"]["n_tokens"],
        "active": result["summary"]["n_active_features"],
        "est_active": est["n_active"],
        "est_peak": est["peak_bytes"],
        "measured_peak": _rss_bytes() - before,
        "rss_before": before,
        "est_seconds": est["seconds"],
        "trace_seconds": timings.get("total_s", 0.0) + timings.get("labels_s", 0.0),
        "wall_seconds": wall,
    }


def measure(args, n_tokens: int) -> dict:
    options = ["--device", args.device, "--label-contexts", str(args.label_contexts),
               "--max-feature-nodes", str(args.max_feature_nodes)]  # fmt: skip
    if args.transcoders:
        options += ["--transcoders", args.transcoders]
    command = [sys.executable, __file__, "--run", args.run, "--child", str(n_tokens), *options]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"trace of {n_tokens} tokens failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run with a transcoder set at every layer")
    parser.add_argument("--tokens", default="8,32,64", help="prompt lengths, BOS included")
    parser.add_argument("--label-contexts", type=int, default=16)
    parser.add_argument("--max-feature-nodes", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--transcoders", default=None, help="the run's transcoder set (default: its only one)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    mib = 2**20
    print(f"{'tokens':>6} {'active':>8} {'est.':>8} | {'peak est.':>9} {'measured':>9} {'ratio':>5} | "
          f"{'time est.':>9} {'measured':>9} {'ratio':>5} | {'wall':>6} {'RSS before':>10}")  # fmt: skip
    for n_tokens in (int(t) for t in args.tokens.split(",")):
        m = measure(args, n_tokens)
        print(f"{m['tokens']:>6} {m['active']:>8,} {m['est_active']:>8,} | {m['est_peak'] / mib:>7.0f}MB "
              f"{m['measured_peak'] / mib:>7.0f}MB {m['est_peak'] / max(m['measured_peak'], 1):>5.2f} | "
              f"{m['est_seconds']:>8.1f}s {m['trace_seconds']:>8.1f}s "
              f"{m['est_seconds'] / max(m['trace_seconds'], 1e-9):>5.2f} | {m['wall_seconds']:>5.1f}s "
              f"{m['rss_before'] / mib:>8.0f}MB", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
