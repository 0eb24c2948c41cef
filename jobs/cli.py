"""The `saescope` command: one subcommand per job, clear one-line errors, resumable on Ctrl-C."""

from __future__ import annotations

import argparse
import sys

from jobs import (
    browse_job,
    cache_job,
    demo_job,
    eval_job,
    import_job,
    index_job,
    serve_job,
    steer_job,
    train_job,
    verify_job,
)
from jobs.common import quiet_libraries, tune_allocator

VERBS = (demo_job, cache_job, verify_job, train_job, eval_job, import_job, index_job, browse_job, steer_job, serve_job)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saescope",
        description="Find the features a language model computes: cache activations, train sparse "
        "autoencoders, index features, steer generations.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        verb.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    tune_allocator()
    try:
        return int(args.handler(args) or 0)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is kept; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
