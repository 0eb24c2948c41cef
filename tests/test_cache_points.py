"""Caches of several hook points from one forward: the same numbers as one-point caches, picked by readers."""

import json

import pytest
import torch

import jobs.cache_shards as cache_fill
from jobs.cache import CacheConfig, format_summary, run_cache
from jobs.cli import main
from jobs.index import IndexConfig, run_index
from jobs.run import open_run
from jobs.train import run_train
from storage.sae_store import SaeStoreError
from storage.shards import CacheError, iter_shards, read_manifest, verify_cache


def _cfg(run, model_dir, corpus, **overrides):
    values = dict(
        run=str(run),
        model=str(model_dir),
        dataset=str(corpus),
        tokens=480,
        ctx_len=16,
        batch_size=3,
        dtype="float32",
        model_dtype="float32",
        device="cpu",
    )
    return CacheConfig(**{**values, **overrides})


def _points_of(run, layer, kind):
    folder = run / "activations"
    manifest = read_manifest(folder).select(layer, kind)
    shards = list(iter_shards(folder, manifest))
    return torch.cat([s.activations_CTD for s in shards]), torch.cat([s.tokens_CT for s in shards])


@pytest.fixture(scope="module")
def many(tmp_path_factory, tiny_model_dir, text_corpus):
    """A cache of mlp-in, mlp-out and resid-post at blocks 0 and 2 of the 4-block tiny model."""
    run = tmp_path_factory.mktemp("many") / "run"
    run_cache(_cfg(run, tiny_model_dir, text_corpus, hooks="mlp-in,mlp-out,resid-post", layers="0,2", shard_tokens=64))
    return run


def test_every_point_equals_its_own_one_point_cache(many, tmp_path, tiny_model_dir, text_corpus):
    manifest = read_manifest(many / "activations")
    assert len(manifest.hook_points) == 6 and len(manifest.shards) == 8
    for layer, kind in [(0, "mlp-in"), (2, "mlp-out"), (2, "resid-post")]:
        single = tmp_path / f"{kind}{layer}"
        run_cache(_cfg(single, tiny_model_dir, text_corpus, hook=kind, layer=layer))
        acts, tokens = _points_of(many, layer, kind)
        one = list(iter_shards(single / "activations", read_manifest(single / "activations")))
        assert torch.equal(acts, torch.cat([s.activations_CTD for s in one]))
        assert torch.equal(tokens, torch.cat([s.tokens_CT for s in one]))


def test_the_forward_stops_after_the_deepest_block(tiny_model_dir, text_corpus, tmp_path, monkeypatch):
    import jobs.cache as cache_job
    from pipeline.lm.hooks import decoder_blocks

    ran, real = [], cache_job.load_model

    def load_and_watch(*args, **kwargs):
        loaded = real(*args, **kwargs)
        for i, block in enumerate(decoder_blocks(loaded.model)):
            block.register_forward_hook(lambda *_, i=i: ran.append(i))
        return loaded

    monkeypatch.setattr(cache_job, "load_model", load_and_watch)
    run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, hooks="mlp-in,mlp-out", layers="0-1", tokens=48))
    assert sorted(set(ran)) == [0, 1]  # blocks 2 and 3 never ran
    manifest = read_manifest(tmp_path / "run" / "activations")
    assert [p["name"] for p in manifest.hook_points][-1] == "blocks.1.hook_mlp_out"
    assert manifest.shard_contexts == 32768 // 4 // 16  # the default shard size is shared by the 4 points


def test_readers_default_to_the_primary_point_and_the_summary_lists_them(many):
    manifest = read_manifest(many / "activations")
    assert (manifest.layer, manifest.hook_kind) == (2, "mlp-in")  # the first kind, at the middle block (2 of 4)
    from jobs.cache import CacheSummary

    text = format_summary(CacheSummary(many, manifest, 0, 0.0, True, False))
    assert "6 hook points (mlp-in at layers 0,2; mlp-out at layers 0,2; resid-post at layers 0,2" in text
    assert "128 B a token each" in text and "--hook KIND --layer L" in text


def test_a_missing_point_is_one_line_naming_what_is_there(many):
    with pytest.raises(CacheError, match=r"holds no attn-out at layer 2: it holds mlp-in at layers 0,2; .*--hook"):
        read_manifest(many / "activations").select(2, "attn-out")


def test_a_damaged_point_is_caught_by_its_own_check_and_by_verify(many, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(many, run)
    folder = run / "activations"
    manifest = read_manifest(folder)
    record = manifest.shards[0]
    path = folder / record.file
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    begin, _ = json.loads(data[8 : 8 + header_len])["blocks.2.hook_resid_post"]["data_offsets"]
    data[8 + header_len + begin] ^= 0xFF  # one byte of that point's tensor
    path.write_bytes(bytes(data))
    layer, kind = 2, "resid-post"
    with pytest.raises(CacheError, match="does not match its sha256"):
        next(iter_shards(folder, manifest.select(layer, kind)))
    next(iter_shards(folder, manifest.select(0, "mlp-in")))  # the other points of that shard still read
    assert len(verify_cache(folder).problems) == 1


def test_resume_after_a_crash_equals_an_uninterrupted_cache(many, tiny_model_dir, text_corpus, tmp_path, monkeypatch):
    real = cache_fill.ShardSink._publish
    calls = []

    def crash_on_third(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(self, *args)

    monkeypatch.setattr(cache_fill.ShardSink, "_publish", crash_on_third)
    points = dict(hooks="mlp-in,mlp-out,resid-post", layers="0,2", shard_tokens=64)
    cfg = _cfg(tmp_path / "run", tiny_model_dir, text_corpus, **points)
    with pytest.raises(RuntimeError, match="killed"):
        run_cache(cfg, background_writes=False)
    monkeypatch.setattr(cache_fill.ShardSink, "_publish", real)
    resumed = run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus), background_writes=False)
    assert 0 < resumed.new_tokens < resumed.manifest.n_tokens  # continued, not restarted; no options needed
    assert [r.sha256 for r in resumed.manifest.shards] == [r.sha256 for r in read_manifest(many / "activations").shards]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--hooks", "mlp-in,mlp-up"], "--hooks 'mlp-in,mlp-up': 'mlp-up' is unknown"),
        (["--hooks", "mlp-in,mlp-in"], "names a kind twice"),
        (["--hook", "mlp-in", "--hooks", "mlp-out"], "give --hook (one kind) or --hooks (several), not both"),
        (["--layers", "3-1"], "--layers: layer range '3-1' is backwards"),
        (["--layers", "x"], "--layers: cannot read layers 'x'"),
        (["--layer", "1", "--layers", "0-2"], "give --layer (one block) or --layers (several), not both"),
    ],
)
def test_bad_points_are_one_line_before_anything_loads(tmp_path, options, message, capsys, monkeypatch):
    import jobs.cache as cache_job

    monkeypatch.setattr(cache_job, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    assert main(["cache", "--run", str(tmp_path / "run"), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_layer_the_model_lacks_is_refused_naming_the_range(tmp_path, tiny_model_dir, text_corpus):
    with pytest.raises(CacheError, match=r"--layers: layer 7 out of range: model has 4 layers \(0-3\)"):
        run_cache(_cfg(tmp_path / "run", tiny_model_dir, text_corpus, hooks="mlp-in", layers="0,7"))


def test_rerunning_with_other_points_is_refused(many, tiny_model_dir, text_corpus):
    with pytest.raises(CacheError, match="hook points: cache has blocks.0.ln2.hook_normalized, .* \\(6 points\\)"):
        run_cache(_cfg(many, tiny_model_dir, text_corpus, tokens=960, hooks="mlp-in", layers="0,2"))


def test_train_and_index_read_the_point_picked(many, tmp_path):
    import shutil

    from conftest import tiny_train_config

    run = tmp_path / "run"
    shutil.copytree(many, run)
    summary = run_train(tiny_train_config(run, name="out0", hook="mlp-out", layer=0, tokens=256 * 4))
    assert summary.config.hook == "mlp-out" and summary.config.layer == 0
    opened = open_run(run, "out0")
    assert opened.hook_point.name == "blocks.0.hook_mlp_out"
    assert run_index(IndexConfig(run=str(run), sae="out0", device="cpu", top_k=3, window=1)).n_features > 0
    with pytest.raises(SaeStoreError, match="'out0' .* reads blocks.0.hook_mlp_out, not blocks.2.ln2.hook_normalized"):
        run_train(tiny_train_config(run, name="out0", tokens=256 * 4))
    with pytest.raises(CacheError, match="holds no attn-out at layer 0"):
        run_train(tiny_train_config(run, name="other", hook="attn-out", layer=0))
