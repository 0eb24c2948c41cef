"""The `saescope` command: one subcommand per job, clear one-line errors, resumable on Ctrl-C."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

VERB_MODULES = (
    "jobs.demo",
    "jobs.cache",
    "jobs.verify",
    "jobs.train",
    "jobs.evaluate",
    "jobs.import_sae",
    "jobs.export_transcoders",
    "jobs.index",
    "jobs.explain",
    "jobs.features",
    "jobs.compare",
    "jobs.steer",
    "jobs.trace",
    "jobs.serve",
)
"""The verbs' modules in `saescope --help` order; each has ``register(subparsers)`` (features registers two)."""
DISTRIBUTED_VERBS = ("cache", "train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saescope",
        description="Find the features a language model computes: cache activations, train sparse "
        "autoencoders, index features, steer generations.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in VERB_MODULES:  # imported here, inside main's Ctrl-C handling (torch takes seconds to import)
        importlib.import_module(name).register(subparsers)
    return parser


def _check_launch(command: str) -> None:
    """Only cache and train run on several ranks; the rest would do the same work N times."""
    from pipeline.runtime.distributed import launched_by_torchrun

    if launched_by_torchrun() and command not in DISTRIBUTED_VERBS:
        raise ValueError(
            f"`saescope {command}` runs in one process: start it without torchrun "
            f"(only {' and '.join(DISTRIBUTED_VERBS)} run on several ranks)"
        )


def _rank_label() -> str:
    if "pipeline.runtime.distributed" not in sys.modules:  # torch never got imported: a single process
        return ""
    return sys.modules["pipeline.runtime.distributed"].rank_label()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _check_launch(args.command)
        from jobs.console import quiet_libraries, tune_allocator

        quiet_libraries()
        tune_allocator()
        return int(args.handler(args) or 0)
    except ValueError as error:
        print(f"error: {_rank_label()}{error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if not _rank_label():
            raise
        from pipeline.runtime.errors import first_line

        print(
            f"error: {_rank_label()}a collective failed, another rank probably stopped ({first_line(error)})",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # exit with 130 even if another Ctrl-C arrives while exiting
        print("\ninterrupted: finished work is kept; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        if "pipeline.runtime.distributed" in sys.modules:
            sys.modules["pipeline.runtime.distributed"].leave()


def entry() -> None:
    """The console script: once main has returned, a late Ctrl-C cannot change the exit status."""
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
