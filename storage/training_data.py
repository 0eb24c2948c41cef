"""Token batches for training, read from the activation cache with a seekable shuffle.

Shape legend: N tokens, D d_model, C contexts, T positions.

* The last ``heldout_contexts`` contexts of the cache are reserved for
  evaluation and never yielded for training.
* Each epoch permutes the shard order (seeded by ``seed`` and the epoch) and cuts
  it into windows of ``window_shards`` shards; a window's non-special tokens are
  pooled and permuted (seeded by seed, epoch and window), so batches mix tokens
  across several shards. A window's last partial batch is dropped.
* Epochs repeat forever; the consumer decides when to stop.
* Under several ranks every rank walks the same stream and keeps its own slice
  of each batch (``part``: rows cut with ``tensor_split``), so the global batch,
  and therefore training, does not depend on the world size.
* The position is a pure function of the batch count: ``iter_batches(start=s)``
  yields exactly what an uninterrupted stream yields from batch ``s`` on,
  reading only shard tokens (not activations) to skip ahead. That is what makes
  training resume exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from storage.shards import CacheError, CacheManifest, ShardRecord, load_shard, load_tokens


@dataclass(frozen=True)
class StreamSpec:
    """How to draw training batches from a cache."""

    batch_size: int
    seed: int = 0
    window_shards: int = 8
    """Shards pooled into one shuffling window (bounded memory: one window in RAM)."""
    heldout_contexts: int = 0
    """Contexts at the end of the cache kept out of training."""


@dataclass(frozen=True)
class ShardSlice:
    """The training part of one shard."""

    record: ShardRecord
    n_ctx: int
    """Contexts of this shard used for training (a prefix)."""


def default_heldout_contexts(n_contexts: int, fraction: float = 0.05, cap: int = 256) -> int:
    """5% of the contexts, at least 2 and at most 256, always leaving some for training."""
    wanted = min(cap, max(2, round(n_contexts * fraction)))
    if wanted >= n_contexts:
        raise CacheError(f"the cache holds only {n_contexts} contexts: too few to hold out evaluation data and train")
    return wanted


def training_slices(manifest: CacheManifest, heldout_contexts: int) -> list[ShardSlice]:
    """Per shard, how many of its contexts are training data (the rest are held out)."""
    first_heldout = manifest.n_contexts - heldout_contexts
    slices = []
    for record in manifest.shards:
        used = max(0, min(record.n_ctx, first_heldout - record.first_context))
        if used:
            slices.append(ShardSlice(record, used))
    return slices


def heldout_range(manifest: CacheManifest, heldout_contexts: int) -> tuple[int, int]:
    """[first, end) global context ids of the held-out contexts."""
    return manifest.n_contexts - heldout_contexts, manifest.n_contexts


def last_context_tokens(folder: Path, manifest: CacheManifest, n_contexts: int) -> torch.Tensor:
    """Token ids [n, T] int64 of the cache's last ``n_contexts`` contexts (only their shards' tokens are read)."""
    first = max(0, manifest.n_contexts - n_contexts)
    rows = [
        load_tokens(folder, record)[max(0, first - record.first_context) :]
        for record in manifest.shards
        if record.first_context + record.n_ctx > first
    ]
    if not rows:
        return torch.zeros((0, manifest.ctx_len), dtype=torch.long)
    return torch.cat(rows).long()


def _special_mask(tokens_CT: torch.Tensor, special_ids: tuple[int, ...]) -> torch.Tensor:
    return torch.isin(tokens_CT, torch.tensor(special_ids, dtype=tokens_CT.dtype))


def to_device(rows_ND: torch.Tensor, device: torch.device) -> torch.Tensor:
    """float32 on ``device``; a CUDA copy goes through pinned memory without blocking the host."""
    if device.type == "cuda":
        return rows_ND.pin_memory().to(device, non_blocking=True).float()
    return rows_ND.float()


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class TrainingStream:
    """Seekable, shuffled token batches from a cache (see the module docstring)."""

    def __init__(self, folder: Path, manifest: CacheManifest, spec: StreamSpec):
        if spec.batch_size < 1 or spec.window_shards < 1:
            raise ValueError("batch_size and window_shards must be positive")
        self.folder, self.manifest, self.spec = Path(folder), manifest, spec
        self.slices = training_slices(manifest, spec.heldout_contexts)
        if not self.slices:
            raise CacheError("no training contexts left after holding out evaluation data")
        self._valid_counts: dict[str, int] = {}
        if self.batches_per_epoch() == 0:
            raise CacheError(
                f"batch size {spec.batch_size} is larger than any shuffling window of the cache "
                f"({self.tokens_per_epoch_upper_bound()} training tokens); use a smaller --batch-size"
            )

    def _valid_tokens(self, piece: ShardSlice) -> int:
        key = piece.record.file
        if key not in self._valid_counts:
            tokens = load_tokens(self.folder, piece.record)[: piece.n_ctx]
            self._valid_counts[key] = int((~_special_mask(tokens, self.manifest.special_token_ids)).sum())
        return self._valid_counts[key]

    def windows(self, epoch: int) -> list[list[ShardSlice]]:
        order = torch.randperm(len(self.slices), generator=_generator(self.spec.seed, epoch)).tolist()
        size = self.spec.window_shards
        return [[self.slices[i] for i in order[start : start + size]] for start in range(0, len(order), size)]

    def _batches_in(self, window: list[ShardSlice]) -> int:
        return sum(self._valid_tokens(piece) for piece in window) // self.spec.batch_size

    def batches_per_epoch(self) -> int:
        return sum(self._batches_in(window) for window in self.windows(0))

    def tokens_per_epoch_upper_bound(self) -> int:
        return sum(self._valid_tokens(piece) for piece in self.slices)

    def _load_window(self, window: list[ShardSlice]) -> torch.Tensor:
        pieces = []
        for piece in sorted(window, key=lambda p: p.record.first_context):
            shard = load_shard(self.folder, self.manifest, piece.record)
            acts = shard.activations_CTD[: piece.n_ctx]
            keep = ~_special_mask(shard.tokens_CT[: piece.n_ctx], self.manifest.special_token_ids)
            pieces.append(acts[keep])
        return torch.cat(pieces)

    def iter_batches(
        self, start: int = 0, device: torch.device | str = "cpu", part: tuple[int, int] = (0, 1)
    ) -> Iterator[torch.Tensor]:
        """float32 batches [batch_size, D], from batch number ``start`` on, forever.

        ``part=(rank, world)`` yields only that rank's rows of each batch.
        """
        rank, world = part
        skip, epoch = start, 0
        while True:
            for w, window in enumerate(self.windows(epoch)):
                n_batches = self._batches_in(window)
                if skip >= n_batches:
                    skip -= n_batches
                    continue
                pool_ND = self._load_window(window)
                perm = torch.randperm(pool_ND.shape[0], generator=_generator(self.spec.seed, epoch, w))
                size = self.spec.batch_size
                for b in range(skip, n_batches):
                    rows = torch.tensor_split(perm[b * size : (b + 1) * size], world)[rank]
                    yield to_device(pool_ND[rows], torch.device(device))
                skip = 0
            epoch += 1

    def sample(self, n_tokens: int) -> torch.Tensor:
        """About ``n_tokens`` training tokens (the start of the stream) for initialization, float32."""
        rows, taken = [], 0
        for batch in self.iter_batches():
            rows.append(batch)
            taken += batch.shape[0]
            if taken >= n_tokens:
                break
        return torch.cat(rows)[:n_tokens]


def iter_heldout(
    folder: Path, manifest: CacheManifest, heldout_contexts: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out (activations [C, T, D] float32, tokens [C, T] int64) per shard, in order."""
    first, _ = heldout_range(manifest, heldout_contexts)
    for record in manifest.shards:
        end = record.first_context + record.n_ctx
        if end <= first:
            continue
        shard = load_shard(folder, manifest, record)
        offset = max(0, first - record.first_context)
        yield shard.activations_CTD[offset:].float(), shard.tokens_CT[offset:].long()
