"""`saescope verify`: check every shard of a run's activation cache against its manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobs.options import add_config_arguments, config_from_args, option
from storage.shards import activations_dir, read_manifest, verify_cache


@dataclass(frozen=True)
class VerifyConfig:
    """Options of `saescope verify`."""

    run: str = option(help="run directory")


def register(subparsers) -> None:
    parser = subparsers.add_parser("verify", help="check the sizes, checksums and shapes of a cache's shards")
    add_config_arguments(parser, VerifyConfig)
    parser.set_defaults(handler=lambda args: command(config_from_args(VerifyConfig, args)))


def command(args: VerifyConfig) -> int:
    folder = activations_dir(Path(args.run))
    manifest = read_manifest(folder)
    report = verify_cache(folder)
    for line in report.strays:
        print(f"note: unlisted shard file {line} (left by a killed job; the next `cache` run overwrites it)")
    for line in report.problems:
        print(f"BAD  {line}")
    if not manifest.shards:
        print(f"{folder}: no finished shard yet: the cache is empty (run `saescope cache --run {args.run}`)")
        return 1
    state = "complete" if manifest.complete else "incomplete (re-run `saescope cache` to finish)"
    verdict = "OK" if not report.problems else f"{len(report.problems)} bad shard(s)"
    print(f"{folder}: {report.n_shards} shards, {manifest.n_tokens:,} tokens, {state}: {verdict}")
    return 0 if not report.problems else 1
