"""The training stream: resuming mid-stream, across windows and epochs, and the held-out split."""

from __future__ import annotations

from itertools import islice

import torch

from pipeline.lm.packing import special_mask
from storage.shards import iter_shards, read_manifest
from storage.training_data import StreamSpec, TrainingStream, heldout_range


def stream(run, **spec) -> TrainingStream:
    manifest = read_manifest(run / "activations")
    values = {"batch_size": 256, "seed": 3, "window_shards": 4, "heldout_contexts": 20, **spec}
    return TrainingStream(run / "activations", manifest, StreamSpec(**values))


def test_starting_at_s_equals_the_tail_from_zero_across_windows_and_epochs(tiny_run):
    data = stream(tiny_run)
    per_epoch = data.batches_per_epoch()
    assert len(data.windows(0)) > 2  # several shuffling windows per epoch
    total = 2 * per_epoch + 5  # into the third epoch
    everything = list(islice(data.iter_batches(0), total))
    for start in (1, per_epoch // 2, per_epoch - 1, per_epoch, per_epoch + 3, 2 * per_epoch + 1):
        tail = list(islice(data.iter_batches(start), total - start))
        assert len(tail) == total - start
        assert all(torch.equal(a, b) for a, b in zip(everything[start:], tail, strict=True)), start
    assert not torch.equal(everything[0], everything[per_epoch])  # epochs are shuffled differently


def test_held_out_contexts_are_never_trained_on(tiny_run):
    manifest = read_manifest(tiny_run / "activations")
    data = stream(tiny_run)
    first, _ = heldout_range(manifest, 20)
    held, trained_rows = [], []
    for shard in iter_shards(tiny_run / "activations", manifest):
        for c in range(shard.record.n_ctx):
            ordinary = ~special_mask(shard.tokens_CT[c : c + 1], manifest.special_token_ids)[0]
            rows = shard.activations_CTD[c][ordinary].float()
            (held if shard.record.first_context + c >= first else trained_rows).append(rows)
    held_rows = torch.cat(held)
    seen = torch.cat(list(islice(data.iter_batches(0), 2 * data.batches_per_epoch())))
    # every batch row is a training row, none is a held-out row (rows compared exactly)
    held_keys = {tuple(row.tolist()) for row in held_rows}
    train_keys = {tuple(row.tolist()) for row in torch.cat(trained_rows)}
    seen_keys = {tuple(row.tolist()) for row in seen}
    only_held = held_keys - train_keys  # identical prefixes (e.g. BOS + the same token) give identical rows
    assert len(only_held) > 0.5 * len(held_keys)
    assert seen_keys <= train_keys and not (seen_keys & only_held)
    assert len(seen_keys) > 0.9 * len(train_keys)  # and (almost) all training rows are used per epoch
