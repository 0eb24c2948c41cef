"""The `saescope` command: one subcommand per job, clear one-line errors, resumable on Ctrl-C."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

VERB_MODULES = ("demo", "cache", "verify", "train", "eval", "import", "index", "explain", "browse", "steer", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saescope",
        description="Find the features a language model computes: cache activations, train sparse "
        "autoencoders, index features, steer generations.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in VERB_MODULES:  # imported here, inside main's Ctrl-C handling (torch takes seconds to import)
        importlib.import_module(f"jobs.{name}_job").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from jobs.common import quiet_libraries, tune_allocator

        quiet_libraries()
        tune_allocator()
        return int(args.handler(args) or 0)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # exit with 130 even if another Ctrl-C arrives while exiting
        print("\ninterrupted: finished work is kept; re-run the same command to resume", file=sys.stderr)
        return 130


def entry() -> None:
    """The console script: once main has returned, a late Ctrl-C cannot change the exit status."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
