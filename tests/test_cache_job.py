"""The cache job on a tiny model: resume after a crash, refusals, clear errors, disk full."""

import errno

import pytest
import torch

import jobs.cache_shards as cache_fill
from jobs.cache import CacheConfig, run_cache
from jobs.run import cache_hook_point
from pipeline.lm.corpus import CorpusError
from pipeline.lm.hook_points import HookPoint, capture
from storage.shards import CacheError, CacheManifest, iter_shards, load_shard, read_manifest, write_manifest


def _cfg(run, model_dir, corpus, **overrides):
    values = dict(
        run=str(run),
        model=str(model_dir),
        dataset=str(corpus),
        tokens=1000,
        ctx_len=16,
        batch_size=3,
        shard_tokens=64,
        dtype="float32",
        model_dtype="float32",
        device="cpu",
    )
    values.update(overrides)
    return CacheConfig(**values)


def _shard_hashes(run):
    return [r.sha256 for r in read_manifest(run / "activations").shards]


def test_cache_matches_a_direct_forward(tmp_path, tiny_model_dir, text_corpus, tiny_model):
    summary = run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, layer=1))
    manifest = summary.manifest
    assert manifest.complete and manifest.n_contexts == 63 and len(manifest.shards) == 16
    assert manifest.provenance["hook"] == {"layer": 1, "name": "blocks.1.hook_resid_post", "kind": "resid-post"}
    shard = next(iter_shards(tmp_path / "run" / "activations", manifest))
    with torch.no_grad():  # oracle independent of the job's hook: the model's own hidden states
        expected = tiny_model(input_ids=shard.tokens_CT.long(), output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(shard.activations_CTD, expected, rtol=1e-5, atol=1e-5)
    assert (shard.tokens_CT[:, 0] == 1).all()
    assert (tmp_path / "run" / "run.toml").read_text().count("layer = 1") == 1


def test_cache_of_mlp_out_is_captures_value_bit_for_bit(tmp_path, tiny_model_dir, text_corpus, tiny_model):
    manifest = run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, layer=1, hook="mlp-out")).manifest
    assert manifest.provenance["hook"] == {"layer": 1, "name": "blocks.1.hook_mlp_out", "kind": "mlp-out"}
    assert cache_hook_point(manifest) == HookPoint(1, "mlp-out")
    assert 'hook = "mlp-out"' in (tmp_path / "run" / "run.toml").read_text()
    for shard in iter_shards(tmp_path / "run" / "activations", manifest):
        expected = capture(tiny_model, shard.tokens_CT.long(), [HookPoint(1, "mlp-out")])[HookPoint(1, "mlp-out")]
        assert shard.activations_CTD.dtype == torch.float32
        assert torch.equal(shard.activations_CTD, expected)


def test_a_manifest_without_a_kind_reads_as_resid_post(tmp_path, tiny_model_dir, text_corpus):
    folder = tmp_path / "run" / "activations"
    run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, layer=1, tokens=128))
    manifest = read_manifest(folder)
    old = {**manifest.provenance, "hook": {"layer": 1, "name": "blocks.1.hook_resid_post"}}
    write_manifest(folder, CacheManifest.from_dict({**manifest.to_dict(), "provenance": old}))
    assert read_manifest(folder).hook_kind == "resid-post"
    assert cache_hook_point(read_manifest(folder)) == HookPoint(1, "resid-post")
    assert run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, layer=1, tokens=128)).already_done
    grown = run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, layer=1, tokens=256, hook="resid-post"))
    assert grown.new_tokens == 128


def test_default_layer_is_the_middle_block(tmp_path, tiny_model_dir, text_corpus):
    manifest = run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, tokens=100)).manifest
    assert manifest.provenance["hook"]["layer"] == 2


def test_rerun_of_a_finished_cache_does_nothing(tmp_path, tiny_model_dir, text_corpus):
    cfg = _cfg(tmp_path / "run", tiny_model_dir, text_corpus)
    run_cache(cfg)
    again = run_cache(cfg)
    assert again.already_done and again.new_tokens == 0


def test_resume_after_crash_equals_uninterrupted(tmp_path, tiny_model_dir, text_corpus, monkeypatch):
    run_cache(_cfg(tmp_path / "whole", tiny_model_dir, text_corpus))
    real_write = cache_fill.write_shard
    written = []

    def crash_after_five(*args, **kwargs):
        if len(written) == 5:
            raise KeyboardInterrupt
        written.append(1)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(cache_fill, "write_shard", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        run_cache(_cfg(tmp_path / "killed", tiny_model_dir, text_corpus))
    partial = read_manifest(tmp_path / "killed" / "activations")
    assert len(partial.shards) == 5 and not partial.complete
    monkeypatch.setattr(cache_fill, "write_shard", real_write)
    resumed = run_cache(_cfg(tmp_path / "killed", tiny_model_dir, text_corpus))
    assert resumed.new_tokens == (63 - 20) * 16
    assert _shard_hashes(tmp_path / "killed") == _shard_hashes(tmp_path / "whole")


def test_asking_for_more_tokens_extends_the_cache(tmp_path, tiny_model_dir, text_corpus):
    run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, tokens=256))
    grown = run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, tokens=512))
    assert grown.manifest.n_tokens == 512 and grown.new_tokens == 256


@pytest.mark.parametrize(
    "change", [{"layer": 0}, {"hook": "mlp-in"}, {"ctx_len": 32, "shard_tokens": 128}, {"dtype": "float16"}]
)
def test_mismatched_rerun_is_refused(tmp_path, tiny_model_dir, text_corpus, change):
    run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, layer=1, tokens=128))
    before = _shard_hashes(tmp_path / "run")
    with pytest.raises(CacheError, match="already holds a different activation cache"):
        run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, **{"layer": 1, "tokens": 256, **change}))
    assert _shard_hashes(tmp_path / "run") == before


def test_resuming_a_hook_cache_without_hook_keeps_its_hook(tmp_path, tiny_model_dir, text_corpus):
    run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, layer=1, hook="attn-out", tokens=128))
    grown = run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, layer=1, tokens=256))
    assert grown.new_tokens == 128 and grown.manifest.hook_kind == "attn-out"
    refused = "hook points: cache has blocks.1.hook_attn_out, requested blocks.1.hook_resid_post"
    with pytest.raises(CacheError, match=refused):
        run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, hook="resid-post", tokens=512))


def test_other_corpus_is_refused(tmp_path, tiny_model_dir, text_corpus):
    run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, tokens=128))
    other = tmp_path / "other.txt"
    other.write_text("completely different text " * 100)
    with pytest.raises(CacheError, match="corpus"):
        run_cache(_cfg(tmp_path / "run", tiny_model_dir, other, tokens=256))


def test_corpus_running_out_is_reported(tmp_path, tiny_model_dir, text_corpus):
    summary = run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, tokens=10**6))
    assert summary.corpus_exhausted and summary.manifest.complete
    assert run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, tokens=10**6)).already_done


def _bad_corpus(tmp_path, kind: str):
    if kind == "missing":
        return tmp_path / "missing.txt", "no such file"
    if kind == "empty-file":
        (tmp_path / "empty.txt").write_text("   \n")
        return tmp_path / "empty.txt", "holds no text"
    (tmp_path / "empty-folder").mkdir()
    return tmp_path / "empty-folder", "no such file or directory, or no .txt"


@pytest.mark.parametrize("kind", ["missing", "empty-file", "empty-folder"])
def test_a_bad_corpus_writes_nothing_and_never_locks_the_run(tmp_path, tiny_model_dir, text_corpus, kind):
    corpus, message = _bad_corpus(tmp_path, kind)
    run = tmp_path / "run"
    with pytest.raises(CorpusError, match=message):
        run_cache(_cfg(run, tiny_model_dir, corpus))
    assert not (run / "activations").exists()
    assert run_cache(_cfg(run, tiny_model_dir, text_corpus, layer=1)).manifest.n_contexts > 0


def test_too_little_text_leaves_a_run_that_restarts_with_other_options(tmp_path, tiny_model_dir, text_corpus):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    run = tmp_path / "run"
    with pytest.raises(CorpusError, match="too little text"):
        run_cache(_cfg(run, tiny_model_dir, short, ctx_len=64, shard_tokens=128))
    assert read_manifest(run / "activations").shards == ()
    assert cache_job_verify(run) == 1  # an empty cache is not "OK"
    summary = run_cache(_cfg(run, tiny_model_dir, text_corpus, layer=0))
    assert summary.manifest.provenance["hook"]["layer"] == 0 and summary.manifest.n_contexts > 0


def cache_job_verify(run) -> int:
    from jobs.cli import main

    return main(["verify", "--run", str(run)])


def test_bad_layer_is_a_clear_error(tmp_path, tiny_model_dir, text_corpus):
    with pytest.raises(ValueError, match=r"layer 9 out of range: model has 4 layers \(0-3\)"):
        run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, layer=9))


def test_disk_full_keeps_finished_shards(tmp_path, tiny_model_dir, text_corpus, monkeypatch):
    real_write = cache_fill.write_shard
    calls = []

    def full_disk_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(cache_fill, "write_shard", full_disk_on_third)
    with pytest.raises(CacheError, match="disk full .* 2 finished shards .* re-run the same command"):
        run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus))
    manifest = read_manifest(tmp_path / "run" / "activations")
    assert len(manifest.shards) == 2
    for record in manifest.shards:
        load_shard(tmp_path / "run" / "activations", manifest, record)


def test_bad_options_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--tokens must be positive"):
        CacheConfig(run=str(tmp_path), tokens=0)
    with pytest.raises(ValueError, match="--ctx-len must be at least 2"):
        CacheConfig(run=str(tmp_path), ctx_len=1)
