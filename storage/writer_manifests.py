"""Per-writer manifests of a cache written by several processes, and their merge into ``manifest.json``.

Shards tile the packed corpus's contexts in order: after the shards a cache
already lists consecutively from context 0 (ending at context P) come shards of
``shard_contexts`` contexts starting at P, P + shard_contexts, ... (the last one
may hold fewer), whoever writes them; a record's ``index`` is its position in
that order, so shard files never collide across writers or world sizes. Each writer lists the shards it finished in
``manifest.<writer>.json``, rewritten atomically after every shard, so a killed
writer loses at most the shard it was computing. ``manifest.json`` lists the
longest run of consecutive finished shards from context 0, so it is always a
valid cache (partial until ``complete``); once every shard is in it, the
per-writer files are deleted.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from storage.atomic import atomic_write_json
from storage.constants import MANIFEST
from storage.shards import CacheManifest, ShardRecord, parse_manifest_file, read_manifest

WRITER_MANIFEST_GLOB = "manifest.*.json"


def writer_manifest_path(folder: Path, writer: str) -> Path:
    return Path(folder) / f"manifest.{writer}.json"


def read_writer_manifests(folder: Path) -> list[CacheManifest]:
    """Every ``manifest.<writer>.json`` in ``folder``."""
    return [parse_manifest_file(path) for path in sorted(Path(folder).glob(WRITER_MANIFEST_GLOB))]


def write_writer_manifest(folder: Path, writer: str, manifest: CacheManifest) -> None:
    atomic_write_json(writer_manifest_path(folder, writer), manifest.to_dict())


def remove_writer_manifests(folder: Path) -> None:
    for path in Path(folder).glob(WRITER_MANIFEST_GLOB):
        path.unlink(missing_ok=True)


def finished_shards(manifests: list[CacheManifest]) -> dict[int, ShardRecord]:
    """First context -> record, over the merged manifest and every writer's."""
    records = {}
    for manifest in manifests:
        for record in manifest.shards:
            records.setdefault(record.first_context, record)
    return records


def exhausted_at(manifests: list[CacheManifest]) -> int | None:
    """The number of contexts in the corpus, if any writer reached its end."""
    seen = [m.extra["exhausted_at"] for m in manifests if m.extra.get("exhausted_at") is not None]
    return min(seen) if seen else None


def consecutive_from_start(records: dict[int, ShardRecord]) -> tuple[ShardRecord, ...]:
    """The shards covering contexts 0, 1, 2, ... without a gap, up to the first missing one."""
    prefix, position = [], 0
    while position in records and records[position].n_ctx > 0:
        prefix.append(records[position])
        position += records[position].n_ctx
    return tuple(prefix)


def read_cache_state(folder: Path) -> tuple[CacheManifest, dict[int, ShardRecord], int | None] | None:
    """(merged manifest, every finished shard by first context, corpus end if known), or None without a manifest."""
    if not (Path(folder) / MANIFEST).is_file():
        return None
    merged = read_manifest(folder)
    manifests = [merged, *read_writer_manifests(folder)]
    return merged, finished_shards(manifests), exhausted_at(manifests)


def merged_manifest(merged: CacheManifest, records: dict[int, ShardRecord], end: int | None) -> CacheManifest:
    """``merged`` listing the consecutive finished shards (and the corpus end, when known)."""
    extra = dict(merged.extra)
    if end is not None:
        extra["exhausted_at"] = end
    return replace(merged, shards=consecutive_from_start(records), extra=extra)
