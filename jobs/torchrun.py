"""Job-level helpers for running under `torchrun`: the lock rank 0 holds for everyone, one dtype for all."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.runtime.distributed import Group
from pipeline.runtime.precision import DtypeChoice, choose_dtype
from storage.locks import exclusive


@contextmanager
def exclusive_on_main(group: Group, path: Path, what: str) -> Iterator[None]:
    """``exclusive`` taken by rank 0 for the whole group; the other ranks wait until rank 0 holds it.

    If rank 0 is refused it exits with the one-line error and torchrun stops the
    ranks waiting here (or the collective timeout does).
    """
    if group.is_main:
        with exclusive(path, what):
            group.barrier()
            yield
    else:
        group.barrier()
        yield


def agreed_dtype(group: Group, requested: str, device: torch.device) -> DtypeChoice:
    """``choose_dtype`` on every rank; "auto" gives bfloat16 only if every rank measured it faster."""
    choice = choose_dtype(requested, device)
    every_rank_bf16 = group.all_true(choice.name == "bfloat16")
    no_rank_bf16 = group.all_true(choice.name != "bfloat16")
    if every_rank_bf16 or no_rank_bf16:
        return choice  # the ranks agree (an explicit request always does)
    return DtypeChoice("float32", f"not every rank measured bfloat16 faster ({choice.reason} here)", choice.gflops)
