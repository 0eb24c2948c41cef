"""`saescope demo`: the whole pipeline on the offline defaults, reusing finished stages."""

from __future__ import annotations

from jobs.cache_job import CacheConfig, format_summary, run_cache

DEMO_RUN = "runs/demo"
DEMO_TOKENS = 200_000


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="cache, train and index on the offline default model and corpus")
    parser.add_argument("--run", default=DEMO_RUN, help=f"run directory (default: {DEMO_RUN})")
    parser.add_argument("--tokens", type=int, default=DEMO_TOKENS, help=f"tokens to cache (default: {DEMO_TOKENS})")
    parser.set_defaults(handler=command)


def command(args) -> int:
    print(f"[1/1] caching {args.tokens:,} tokens of SmolLM2-135M-Instruct activations into {args.run}")
    summary = run_cache(CacheConfig(run=args.run, tokens=args.tokens))
    print(format_summary(summary))
    return 0
