"""Shard format: round trip, checksums, truncation, manifest order."""

import pytest
import torch

from storage.shards import (
    CacheError,
    CacheManifest,
    CorruptShardError,
    iter_shards,
    load_shard,
    read_manifest,
    verify_cache,
    write_manifest,
    write_shard,
)


def _manifest(ctx_len=5, d_model=4):
    return CacheManifest(
        provenance={
            "model": {"spec": "tiny", "name": "tiny", "revision": "local:0", "n_layers": 2},
            "hook": {"layer": 1, "name": "blocks.1.hook_resid_post"},
            "corpus": {"description": "test"},
            "model_dtype": {"name": "float32"},
        },
        d_model=d_model,
        ctx_len=ctx_len,
        dtype="float16",
        special_token_ids=(1, 2),
        shard_contexts=3,
    )


def _write(folder, manifest, n_ctx=3, seed=0, dtype="float16"):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n_ctx, manifest.ctx_len, manifest.d_model, generator=g)
    tokens = torch.randint(0, 100, (n_ctx, manifest.ctx_len), generator=g)
    index = len(manifest.shards)
    record = write_shard(folder, "w00", index, manifest.n_contexts, acts, tokens, dtype)
    manifest = manifest.with_shard(record)
    write_manifest(folder, manifest)
    return manifest, acts, tokens


@pytest.mark.parametrize(
    "dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)]
)
def test_round_trip(tmp_path, dtype, torch_dtype):
    manifest, acts, tokens = _write(tmp_path, _manifest(), dtype=dtype)
    shard = load_shard(tmp_path, read_manifest(tmp_path), manifest.shards[0])
    assert shard.activations_CTD.dtype == torch_dtype
    assert shard.tokens_CT.dtype == torch.int32
    torch.testing.assert_close(shard.activations_CTD, acts.to(torch_dtype), rtol=0, atol=0)
    assert torch.equal(shard.tokens_CT, tokens.to(torch.int32))


def test_manifest_round_trip_and_counts(tmp_path):
    manifest, _, _ = _write(tmp_path, _manifest())
    manifest, _, _ = _write(tmp_path, manifest, n_ctx=2, seed=1)
    again = read_manifest(tmp_path)
    assert again == manifest
    assert again.n_contexts == 5 and again.n_tokens == 25
    assert [r.file for r in again.shards] == ["w00-000000.safetensors", "w00-000001.safetensors"]
    assert [s.record.first_context for s in iter_shards(tmp_path, again)] == [0, 3]


def test_flipped_byte_is_detected(tmp_path):
    manifest, _, _ = _write(tmp_path, _manifest())
    path = tmp_path / manifest.shards[0].file
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"w00-000000\.safetensors is corrupt: sha256"):
        load_shard(tmp_path, manifest, manifest.shards[0])
    report = verify_cache(tmp_path)
    assert len(report.problems) == 1 and "w00-000000" in report.problems[0]


def test_truncated_shard_is_detected(tmp_path):
    manifest, _, _ = _write(tmp_path, _manifest())
    path = tmp_path / manifest.shards[0].file
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptShardError, match="truncated"):
        load_shard(tmp_path, manifest, manifest.shards[0])


def test_missing_shard_and_missing_manifest(tmp_path):
    manifest, _, _ = _write(tmp_path, _manifest())
    (tmp_path / manifest.shards[0].file).unlink()
    assert "missing" in verify_cache(tmp_path).problems[0]
    with pytest.raises(CacheError, match="no activation cache"):
        read_manifest(tmp_path / "elsewhere")


def test_shards_must_be_added_in_order(tmp_path):
    manifest = _manifest()
    record = write_shard(tmp_path, "w00", 0, 7, torch.zeros(3, 5, 4), torch.zeros(3, 5), "float16")
    with pytest.raises(CacheError, match="starts at context 7, expected 0"):
        manifest.with_shard(record)


def test_unlisted_file_is_a_stray_not_a_problem(tmp_path):
    manifest, _, _ = _write(tmp_path, _manifest())
    write_shard(tmp_path, "w00", 1, 3, torch.zeros(3, 5, 4), torch.zeros(3, 5), "float16")
    report = verify_cache(tmp_path)
    assert report.problems == () and len(report.strays) == 1
