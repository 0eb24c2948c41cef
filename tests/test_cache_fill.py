"""The shard plan, the context stream and the background writer of `saescope cache` (no processes)."""

from dataclasses import replace

import pytest
from test_cache_job import _cfg, _shard_hashes

from jobs.cache import run_cache
from jobs.cache_shards import ContextStream, ShardTask, plan_shards
from pipeline.runtime.distributed import Group
from storage.shards import ShardRecord, read_manifest
from storage.writer_manifests import consecutive_from_start


def _record(first: int, n_ctx: int, writer: str = "w00") -> ShardRecord:
    return ShardRecord(f"{writer}-{first}", writer, 0, first, n_ctx, "0" * 64, 1)


def test_plan_deals_the_unfinished_tiling_round_robin():
    finished = {r.first_context: r for r in (_record(0, 10), _record(10, 10), _record(40, 10, "w01"))}
    everyone = [plan_shards(finished, 95, 10, Group(rank, 3)) for rank in range(3)]
    assert everyone[0] == [ShardTask(2, 20, 10), ShardTask(6, 60, 10), ShardTask(9, 90, 5)]
    assert everyone[1] == [ShardTask(3, 30, 10), ShardTask(7, 70, 10)]
    assert everyone[2] == [ShardTask(5, 50, 10), ShardTask(8, 80, 10)]
    assert plan_shards(finished, 95, 10, Group(0, 1)) == sorted(sum(everyone, []), key=lambda t: t.index)


def test_an_extended_cache_tiles_on_from_its_last_context():
    finished = {0: _record(0, 10), 10: _record(10, 3)}  # an earlier, smaller --tokens ended at context 13
    assert plan_shards(finished, 40, 10, Group()) == [ShardTask(2, 13, 10), ShardTask(3, 23, 10), ShardTask(4, 33, 7)]


def test_consecutive_prefix_stops_at_the_first_gap():
    records = {0: _record(0, 10), 10: _record(10, 10), 30: _record(30, 10)}
    assert [r.first_context for r in consecutive_from_start(records)] == [0, 10]
    assert consecutive_from_start({}) == ()


def test_context_stream_skips_forward_and_reports_the_end():
    stream = ContextStream(iter([[i] for i in range(25)]))
    assert stream.take(3, 4) == ([[3], [4], [5], [6]], False)
    assert stream.take(20, 10) == ([[20], [21], [22], [23], [24]], True)
    assert stream.consumed == 25
    with pytest.raises(ValueError, match="cannot go back"):
        stream.take(0, 1)


def test_background_writer_writes_what_the_synchronous_path_writes(tmp_path, tiny_model_dir, text_corpus):
    threaded = run_cache(_cfg(tmp_path / "threaded", tiny_model_dir, text_corpus), background_writes=True)
    direct = run_cache(_cfg(tmp_path / "direct", tiny_model_dir, text_corpus), background_writes=False)
    assert _shard_hashes(tmp_path / "threaded") == _shard_hashes(tmp_path / "direct")
    assert len(threaded.manifest.shards) == len(direct.manifest.shards) == 16
    assert _without_provenance(read_manifest(tmp_path / "threaded" / "activations")) == _without_provenance(
        direct.manifest
    )


def _without_provenance(manifest):
    return replace(manifest, provenance={}, extra={})
