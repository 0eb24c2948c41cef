"""Compute and publish the shards one process owns: the plan, the model loop, the background writer.

Every rank packs the same context stream (packing is sequential, so each rank
tokenizes the corpus up to its last shard and skips the contexts of other
ranks' shards). The shards still to do are dealt round-robin to the ranks of
this launch, whatever world size wrote the finished ones. Writing a shard
(serialize, sha256, fsync, rename, manifest) runs on one background thread
while the model computes the next shard; at most one shard waits, so memory
stays bounded, and the files are the same bytes the synchronous path writes.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import torch

from jobs.console import progress
from pipeline.lm.activations import compute_point_activations
from pipeline.lm.corpus import iter_documents
from pipeline.lm.hook_points import HookPoint
from pipeline.lm.packing import pack_contexts
from pipeline.runtime.distributed import Group
from storage.shards import STORAGE_DTYPES, CacheError, CacheManifest, ShardRecord, write_manifest, write_shard
from storage.writer_manifests import (
    consecutive_from_start,
    merged_manifest,
    read_cache_state,
    write_writer_manifest,
)


@dataclass(frozen=True)
class ShardTask:
    """One shard to compute: its position in the cache and its contexts."""

    index: int
    first_context: int
    n_ctx: int


def plan_shards(records: dict[int, ShardRecord], limit: int, shard_contexts: int, group: Group) -> list[ShardTask]:
    """This rank's unfinished shards: the tiling after the consecutive prefix, less finished ones, round-robin."""
    prefix = consecutive_from_start(records)
    start = sum(record.n_ctx for record in prefix)
    layout = [
        ShardTask(len(prefix) + i, first, min(shard_contexts, limit - first))
        for i, first in enumerate(range(start, limit, shard_contexts))
    ]
    remaining = [task for task in layout if task.first_context not in records]
    return remaining[group.rank :: group.world]


class ContextStream:
    """The packed context stream, read forward only, counting what it consumed."""

    def __init__(self, contexts: Iterator[list[int]]):
        self._contexts = contexts
        self.consumed = 0

    def take(self, first: int, count: int) -> tuple[list[list[int]], bool]:
        """Contexts [first, first + count) (fewer at the corpus's end) and whether the corpus ended."""
        if first < self.consumed:
            raise ValueError(f"context stream is at {self.consumed}, cannot go back to {first}")
        skipped = sum(1 for _ in islice(self._contexts, first - self.consumed))
        batch = list(islice(self._contexts, count))
        self.consumed += skipped + len(batch)
        return batch, len(batch) < count


class ShardSink:
    """Publishes shards and keeps this writer's manifest (and, on rank 0, ``manifest.json``) current."""

    def __init__(
        self,
        folder: Path,
        header: CacheManifest,
        writer: str,
        group: Group,
        dtype: str,
        background: bool,
        finished: dict[int, ShardRecord],
    ):
        self.folder, self.writer, self.group, self.dtype = folder, writer, group, dtype
        earlier = tuple(r for _, r in sorted(finished.items()) if r.writer == writer)  # a launch of another size
        self.mine = replace(header, shards=earlier, complete=False, extra={})
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer") if background else None
        self._pending: Future | None = None

    def put(self, task: ShardTask, acts: torch.Tensor | dict[str, torch.Tensor], tokens_CT: torch.Tensor) -> None:
        """Publish one shard (on the background thread when there is one; waits for the previous shard first)."""
        self.wait()
        if self._pool is None:
            self._publish(task, acts, tokens_CT)
        else:
            self._pending = self._pool.submit(self._publish, task, acts, tokens_CT)

    def note_corpus_end(self, n_contexts: int) -> None:
        self.wait()
        self.mine = replace(self.mine, extra={**self.mine.extra, "exhausted_at": n_contexts})
        write_writer_manifest(self.folder, self.writer, self.mine)
        self._merge()

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises the writer's error here

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _publish(self, task: ShardTask, acts: torch.Tensor | dict[str, torch.Tensor], tokens_CT: torch.Tensor) -> None:
        try:
            record = write_shard(self.folder, self.writer, task.index, task.first_context, acts, tokens_CT, self.dtype)
            self.mine = replace(self.mine, shards=(*self.mine.shards, record))
            write_writer_manifest(self.folder, self.writer, self.mine)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise CacheError(
                    f"disk full while writing shard {task.index} to {self.folder}: the {len(self.mine.shards)} "
                    "finished shards of this writer are kept; "
                    "free some space and re-run the same command to resume"
                ) from error
            raise
        self._merge()

    def _merge(self) -> None:
        """Rank 0 lists every consecutive finished shard in manifest.json (cheap: a few small JSON files)."""
        if self.group.is_main:
            merged, records, end = read_cache_state(self.folder)
            write_manifest(self.folder, merged_manifest(replace(merged, complete=False), records, end))


def compute_shards(
    model: torch.nn.Module,
    tokenizer,
    corpus,
    tasks: list[ShardTask],
    points: tuple[HookPoint, ...],
    batch_size: int,
    ctx_len: int,
    sink: ShardSink,
) -> None:
    """Compute and publish ``tasks`` (activations at ``points``, one forward each batch) in order.

    At the corpus's end, record it and stop. One point is stored as ``activations``,
    several by their hook names (``storage.shards``).
    """
    stream = ContextStream(pack_contexts(iter_documents(corpus), tokenizer, ctx_len))
    out_dtype = STORAGE_DTYPES[sink.dtype]
    total = sum(task.n_ctx for task in tasks) * ctx_len
    label = f"cache (rank {sink.group.rank} of {sink.group.world})" if sink.group.distributed else "cache"
    with progress(total, label, disable=not sink.group.is_main) as bar:
        try:
            for task in tasks:
                batch, ended = stream.take(task.first_context, task.n_ctx)
                if batch:
                    tokens_CT = torch.tensor(batch, dtype=torch.int32)
                    acts = compute_point_activations(model, tokens_CT, points, batch_size, out_dtype, bar.update)
                    stored = acts[points[0]] if len(points) == 1 else {p.name: acts[p] for p in points}
                    sink.put(task, stored, tokens_CT)
                if ended:
                    sink.note_corpus_end(stream.consumed)
                    return
        finally:
            sink.close()
