"""Verbs on a cache of a non-residual hook point: splicing, SAE eval, steering and probing read that point.

One small float32 cache of the tiny model per kind (layer 1). The cache's own
activations are the oracle: spliced back at the cache's point they must leave the
model's loss exactly clean, and spliced at any other point they must not.
"""

import dataclasses
import json
import math
import shutil

import pytest
import torch
from conftest import tiny_cache_config, tiny_train_config

from jobs.cache import run_cache
from jobs.cli import main
from jobs.heldout import EvalSettings, lm_metrics
from jobs.run import cache_hook_point, check_fits_cache, load_run_model
from jobs.train import run_train
from pipeline.evaluation.lm_loss import splice_metrics
from pipeline.features.probe import probe
from pipeline.lm.hook_points import KINDS, HookPoint, capture
from pipeline.lm.packing import special_mask
from pipeline.sae.model import Sae, SaeConfig
from pipeline.steering.edit import FeatureSteer, SteeringSpec, steer
from pipeline.steering.generation import SamplingConfig, compare
from storage.sae_store import SaeStoreError
from storage.shards import iter_shards, read_manifest


@pytest.fixture(scope="module")
def caches(tmp_path_factory, tiny_model_dir, text_corpus) -> dict[str, object]:
    """kind -> run folder holding a finished layer-1 cache of that kind (float32, 1024 tokens)."""
    runs = {}
    for kind in KINDS:
        run = tmp_path_factory.mktemp(f"hook-{kind}") / "run"
        cfg = tiny_cache_config(run, tiny_model_dir, text_corpus)
        run_cache(dataclasses.replace(cfg, layer=1, hook=kind, tokens=1024, shard_tokens=256))
        runs[kind] = run
    return runs


def _first_shard(run):
    manifest = read_manifest(run / "activations")
    return manifest, next(iter_shards(run / "activations", manifest))


def _cached_splice(run, point: HookPoint):
    """Splice the cache's exact activations of its first shard into the model at ``point``."""
    manifest, shard = _first_shard(run)
    ordinary_CT = ~special_mask(shard.tokens_CT, manifest.special_token_ids)
    cached_ND = shard.activations_CTD[ordinary_CT]
    model = load_run_model(manifest, "cpu").model
    n_ctx = shard.tokens_CT.shape[0]
    return splice_metrics(model, point, lambda _h: cached_ND, shard.tokens_CT, ordinary_CT, batch_size=n_ctx)


@pytest.mark.parametrize("kind", KINDS)
def test_splicing_the_cached_activation_back_leaves_the_loss_clean(caches, kind):
    manifest = read_manifest(caches[kind] / "activations")
    assert cache_hook_point(manifest) == HookPoint(1, kind)
    result = _cached_splice(caches[kind], cache_hook_point(manifest))
    assert result.kl_zero > 1e-7 and result.ce_zero != result.ce_clean  # zeroing the point changes the model
    assert abs(result.ce_loss_recovered - 1.0) < 1e-6
    assert abs(result.ce_spliced - result.ce_clean) < 1e-6 and result.kl_spliced < 1e-9


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_values_at_another_point_do_not(caches, kind):
    """The check above has teeth: the cached values are wrong anywhere but their own point."""
    other = KINDS[(KINDS.index(kind) + 1) % len(KINDS)]
    result = _cached_splice(caches[kind], HookPoint(1, other))
    assert result.kl_spliced > 1e-7 and result.ce_spliced != result.ce_clean


def test_an_sae_on_mlp_out_records_its_hook_evaluates_and_steers(caches, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(caches["mlp-out"], run)
    summary = run_train(tiny_train_config(run, tokens=256 * 4, checkpoint_every=None, lm_eval_contexts=4))
    cfg = json.loads((run / "saes" / "default" / "cfg.json").read_text())
    assert cfg["meta"]["hook_name"] == "blocks.1.hook_mlp_out" and cfg["meta"]["hook_layer"] == 1
    assert math.isfinite(summary.metrics["ce_loss_recovered"])
    args = ["steer", "--run", str(run), "--feature", "3", "--value", "5", "--mode", "add", "--prompt", "The cat"]
    assert main([*args, "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu", "--json"]) == 0
    resid = read_manifest(caches["resid-post"] / "activations")
    with pytest.raises(SaeStoreError, match="reads blocks.1.hook_mlp_out but the cache holds blocks.1.hook_resid_post"):
        check_fits_cache(cfg, resid, run / "saes" / "default")


class _Identity:
    """An SAE stand-in whose reconstruction is exact (lm_metrics only calls .to and .reconstruct)."""

    def to(self, _device):
        return self

    def reconstruct(self, x_ND):
        return x_ND


@pytest.mark.parametrize("kind", KINDS)
def test_eval_splices_at_the_caches_point(caches, kind):
    manifest = read_manifest(caches[kind] / "activations")
    loaded = load_run_model(manifest, "cpu")
    out = lm_metrics(_Identity(), caches[kind], manifest, EvalSettings(heldout_contexts=8, lm_contexts=4), loaded)
    assert abs(out["ce_loss_recovered"] - 1.0) < 1e-6


def _random_sae(d_in: int, seed: int = 0) -> Sae:
    torch.manual_seed(seed)
    sae = Sae(SaeConfig(d_in=d_in, d_sae=16, architecture="relu"))
    with torch.no_grad():
        for name in ("W_enc_FD", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).normal_(0, 0.3)
    return sae.eval()


def test_steering_an_mlp_out_feature_moves_the_mlp_output_by_the_vector(tiny_model, tokenizer):
    point, mid = HookPoint(1, "mlp-out"), HookPoint(1, "mlp-in")
    sae = _random_sae(tiny_model.config.hidden_size)
    ids = tokenizer(["The cat sat on the mat."], return_tensors="pt").input_ids
    spec = SteeringSpec((FeatureSteer(3, "add", 2.0, "generated"),), prompt_len=4)
    clean = capture(tiny_model, ids, [point, mid, HookPoint(1, "resid-post")])
    with steer(tiny_model, sae, point, spec):
        steered = capture(tiny_model, ids, [point, mid, HookPoint(1, "resid-post")])
    vector_D = 2.0 * sae.W_dec[3].detach()
    diff_TD = (steered[point] - clean[point])[0]
    assert torch.equal(diff_TD[:4], torch.zeros_like(diff_TD[:4]))
    torch.testing.assert_close(diff_TD[4:], vector_D.expand_as(diff_TD[4:]), rtol=0, atol=1e-6)
    assert torch.equal(steered[mid], clean[mid])  # the MLP's input is upstream of the edit
    torch.testing.assert_close((steered[HookPoint(1, "resid-post")] - clean[HookPoint(1, "resid-post")])[0], diff_TD)


def test_steering_reports_feature_activations_read_at_the_point(tiny_model, tokenizer):
    point = HookPoint(1, "mlp-out")
    sae = _random_sae(tiny_model.config.hidden_size)
    prompt = tokenizer("The cat").input_ids
    spec = SteeringSpec((FeatureSteer(3, "clamp", 5.0, "all"),))
    result = compare(tiny_model, sae, point, spec, prompt, SamplingConfig(max_new_tokens=3, temperature=0), None)
    ids = torch.tensor([prompt + result.default.token_ids])
    expected = sae.encode(capture(tiny_model, ids, [point])[point][0, len(prompt) :])[:, 3]
    torch.testing.assert_close(torch.tensor(result.default.feature_acts[3]), expected.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_probe_reads_what_the_cache_holds(caches, kind):
    manifest, shard = _first_shard(caches[kind])
    model = load_run_model(manifest, "cpu").model
    sae = _random_sae(manifest.d_model)
    tokens = shard.tokens_CT[0].tolist()
    result = probe(model, sae, cache_hook_point(manifest), tokens, manifest.special_token_ids)
    expected_TF = sae.encode(shard.activations_CTD[0]).detach()
    torch.testing.assert_close(result.feats_TF, expected_TF, rtol=1e-5, atol=1e-6)
