"""The process group a job runs in: one process, or one rank of a `torchrun` launch.

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables;
``from_environment`` joins that group (gloo on CPU; on CUDA, NCCL for GPU
tensors and gloo for the few CPU flags, with a
timeout so a stuck collective fails instead of hanging) and returns a ``Group``
whose collectives are no-ops when the world size is 1. Jobs only ever talk to a
``Group``, so the single-process path and the distributed path are one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800
TIMEOUT_VARIABLE = "SAESCOPE_DIST_TIMEOUT"


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a multi-process launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Rank 0 of a launch, or a single process: the one that prints summaries."""
    return int(os.environ.get("RANK", "0")) == 0


def rank_label() -> str:
    """'rank R of W: ' under torchrun (for error lines), else ''."""
    if not launched_by_torchrun():
        return ""
    return f"rank {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']}: "


def timeout_seconds() -> int:
    """Collective timeout: SAESCOPE_DIST_TIMEOUT seconds, default 30 minutes."""
    text = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{TIMEOUT_VARIABLE}={text!r} must be a whole number of seconds >= 1")
    return int(text)


@dataclass(frozen=True)
class Group:
    """This process's rank in a world of ``world`` processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> str:
        """Shard-name prefix of this rank."""
        return f"w{self.rank:02d}"

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum_(self, *tensors: torch.Tensor) -> None:
        """In place: every tensor becomes its sum over ranks (one collective for all of them)."""
        if not self.distributed or not tensors:
            return
        if len(tensors) == 1:
            dist.all_reduce(tensors[0])
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def broadcast_(self, *tensors: torch.Tensor) -> None:
        """In place: every rank gets rank 0's values."""
        if self.distributed:
            for t in tensors:
                dist.broadcast(t, src=0)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        if not self.distributed:
            return flag
        value = torch.tensor([0 if flag else 1])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value) == 0

    def device(self, requested: torch.device) -> torch.device:
        """A CUDA request means this rank's own GPU (LOCAL_RANK); CPU stays CPU."""
        if self.distributed and requested.type == "cuda" and requested.index is None:
            return torch.device("cuda", self.local_rank)
        return requested


SINGLE = Group()


def from_environment(device: torch.device) -> Group:
    """Join the torchrun process group (once per process), or return the single-process group."""
    if not launched_by_torchrun():
        return SINGLE
    group = Group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(group.device(device))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds()))
    return group


def leave() -> None:
    """Tear the process group down (end of a distributed job)."""
    if dist.is_initialized():
        dist.destroy_process_group()
