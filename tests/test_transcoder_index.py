"""The transcoder index on a tiny model: statistics and top examples against brute force, dense mark, resume."""

from __future__ import annotations

import shutil

import pytest
import torch

import jobs.index_transcoders as tc_index
from jobs.index import IndexConfig
from jobs.options import ConfigError
from pipeline.lm.hook_points import HookPoint, capture
from pipeline.lm.models import load_model
from pipeline.lm.packing import special_mask
from pipeline.sae.transcoder_format import transcoder_from_saelens
from storage.index_queries import FeatureIndex, open_transcoder_index
from storage.shards import iter_shards, read_manifest
from storage.transcoder_store import layer_dir, load_layer_files

SET = "tc"


def config(run, **overrides) -> IndexConfig:
    values = dict(run=str(run), transcoders=SET, device="cpu", top_k=5, window=4, batch_contexts=7)
    return IndexConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def tc_indexed(tmp_path_factory, transcoder_run):
    run = tmp_path_factory.mktemp("tc-index") / "run"
    shutil.copytree(transcoder_run, run)
    summary = tc_index.run_transcoder_index(config(run, tokens=32 * 200))
    return run, summary


def dense_codes(run, layer: int, n_contexts: int):
    """(codes [C, T, F] at ordinary tokens, 0 elsewhere, ordinary mask [C, T]) computed token-batch-free."""
    manifest = read_manifest(run / "activations")
    model = load_model(manifest.model_spec, "cpu").model
    tc = transcoder_from_saelens(*load_layer_files(run / "transcoders" / SET, layer))
    tokens = torch.cat([shard.tokens_CT.long() for shard in iter_shards(run / "activations", manifest)])[:n_contexts]
    point = HookPoint(layer, "mlp-in")
    with torch.no_grad():
        x_CTD = torch.cat([capture(model, tokens[c : c + 1], [point])[point] for c in range(n_contexts)]).float()
        codes_CTF = tc.encode(x_CTD.reshape(-1, x_CTD.shape[-1])).reshape(*x_CTD.shape[:2], -1)
    ordinary = ~special_mask(tokens, manifest.special_token_ids)
    return codes_CTF * ordinary.unsqueeze(-1), ordinary


def test_every_layer_is_indexed_with_brute_force_statistics(tc_indexed):
    run, summary = tc_indexed
    assert [entry.layer for entry in summary.layers] == [0, 1, 2, 3] and summary.source == "model"
    for layer in (0, 3):
        codes_CTF, ordinary = dense_codes(run, layer, 200)
        flat_NF = codes_CTF[ordinary]
        with open_transcoder_index(run / "transcoders" / SET, layer) as index:
            rows = index._rows("SELECT * FROM features ORDER BY feature", [])
            assert index.metadata["hook"]["name"] == f"blocks.{layer}.ln2.hook_normalized"
            assert index.metadata["tokens_indexed"] == int(ordinary.sum())
            active = (flat_NF > 0).sum(0)
            assert [r["n_active"] for r in rows] == active.tolist()
            torch.testing.assert_close(torch.tensor([r["max_act"] for r in rows]), flat_NF.max(0).values)
            means = flat_NF.sum(0) / active.clamp_min(1)
            torch.testing.assert_close(torch.tensor([r["mean_act"] for r in rows]), means, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                torch.tensor([r["density"] for r in rows]), active.double() / ordinary.sum(), check_dtype=False
            )
            peak_CF = codes_CTF.max(1).values
            for feature in torch.nonzero(active)[:6, 0].tolist():
                top = index.top_examples(feature, limit=5)
                expected = torch.argsort(-peak_CF[:, feature], stable=True)[:5]
                expected = [int(c) for c in expected if peak_CF[c, feature] > 0]
                assert [e.context for e in top] == expected
                torch.testing.assert_close(
                    torch.tensor([e.activation for e in top]), peak_CF[expected, feature], rtol=1e-5, atol=1e-6
                )


def test_dense_mark_follows_the_threshold(tc_indexed, tmp_path):
    run, _ = tc_indexed
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with FeatureIndex(layer_dir(copy / "transcoders" / SET, 1) / "features.duckdb") as index:
        densities = sorted(r["density"] for r in index._rows("SELECT density FROM features", []))
    threshold = densities[len(densities) // 2]  # half the latents above it, at most
    summary = tc_index.run_transcoder_index(config(copy, tokens=32 * 200, layers="1", dense_threshold=threshold))
    assert [entry.skipped for entry in summary.layers] == [False]  # other settings: rebuilt
    with open_transcoder_index(copy / "transcoders" / SET, 1) as index:
        rows = index._rows("SELECT feature, density, dense FROM features ORDER BY feature", [])
        assert [r["dense"] for r in rows] == [r["density"] > threshold for r in rows]
        assert 0 < index.dense_count() < len(rows)
        assert index.metadata["dense"]["threshold"] == threshold
        assert index.densities([0, 1]) == {r["feature"]: (r["density"], r["dense"]) for r in rows[:2]}
    assert summary.layers[0].n_dense == sum(r["dense"] for r in rows)


def test_a_killed_index_leaves_nothing_and_a_rerun_resumes_by_layer(transcoder_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(transcoder_run, run)
    finish = tc_index._finish_layer

    def killed_at_layer_2(entry, *args):
        if entry.layer == 2:
            raise KeyboardInterrupt
        return finish(entry, *args)

    monkeypatch.setattr(tc_index, "_finish_layer", killed_at_layer_2)
    with pytest.raises(KeyboardInterrupt):
        tc_index.run_transcoder_index(config(run, tokens=32 * 40))
    folder = run / "transcoders" / SET
    leftovers = [p.name for layer in range(4) for p in layer_dir(folder, layer).iterdir() if "index" in p.name
                 or "features" in p.name]  # fmt: skip
    assert sorted(leftovers) == ["features.duckdb", "features.duckdb"]  # layers 0 and 1 only, no temp files
    monkeypatch.setattr(tc_index, "_finish_layer", finish)
    summary = tc_index.run_transcoder_index(config(run, tokens=32 * 40))
    assert [entry.skipped for entry in summary.layers] == [True, True, False, False]
    again = tc_index.run_transcoder_index(config(run, tokens=32 * 40))
    assert all(entry.skipped for entry in again.layers)
    assert "already indexed" in tc_index.format_summary(again, str(run))


def test_bad_layers_and_set_are_clear_errors(transcoder_run):
    with pytest.raises(ConfigError, match="layer 7 out of range"):
        tc_index.run_transcoder_index(config(transcoder_run, layers="7"))
    with pytest.raises(ConfigError, match="exclude each other"):
        config(transcoder_run, sae="default")
    with pytest.raises(ConfigError, match="--layers needs --transcoders"):
        config(transcoder_run, transcoders=None, layers="3")


def test_traced_graph_labels_and_density_come_from_the_index(tc_indexed, tmp_path):
    from jobs.cli import main
    from pipeline.tracing.feature_labels import example_text, quoted_tokens
    from storage.graph_groups import read_graph_json

    run = tmp_path / "run"
    shutil.copytree(tc_indexed[0], run)
    keep_all = ["--node-threshold", "1", "--edge-threshold", "1", "--label-contexts", "0"]
    assert main(["trace", "--run", str(run), "--prompt", "The cat sat", "--name", "cat", *keep_all]) == 0
    nodes = [n for n in read_graph_json(run, "cat")["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert nodes
    checked = 0
    for node in nodes:
        layer, latent = int(node["layer"]), int(node["node_id"].split("_")[1])
        with open_transcoder_index(run / "transcoders" / SET, layer) as index:
            density, dense = index.densities([latent])[latent]
            peaks = [index.vocab_text(t) for t in index.peak_tokens([latent])[latent]]
            promoted = [index.vocab_text(t) for t in index.promoted_tokens([latent])[latent]]
            top = index.top_examples(latent, limit=1)
        assert node.get("saescope_example") == (example_text(top[0].tokens, top[0].peak) if top else None)
        assert node["saescope_density"] == density and node["saescope_dense"] == dense
        assert node["clerp"].endswith(" → promotes " + quoted_tokens(promoted))
        if peaks:  # it fired in the indexed contexts: the label reads from its top examples, not the prompt
            assert node["clerp"].startswith("fires on " + quoted_tokens(peaks) + " → ")
            checked += 1
    assert checked


def test_explain_labels_only_the_graphs_latents_and_labels_use_it(tc_indexed, tmp_path):
    from jobs.cli import main
    from jobs.explain import ExplainConfig, run_explain
    from pipeline.tracing.feature_labels import explanation_phrase
    from storage.explanations import ExplanationReader, explanations_path
    from storage.graph_groups import read_graph_json

    run = tmp_path / "run"
    shutil.copytree(tc_indexed[0], run)
    keep_all = ["--node-threshold", "1", "--edge-threshold", "1", "--label-contexts", "0"]
    assert main(["trace", "--run", str(run), "--prompt", "The cat", "--name", "cat", *keep_all]) == 0
    nodes = [n for n in read_graph_json(run, "cat")["nodes"] if n["feature_type"] == "cross layer transcoder"]
    wanted = {(int(n["layer"]), int(n["node_id"].split("_")[1])) for n in nodes}
    cfg = ExplainConfig(run=str(run), transcoders=SET, graphs="all", scorers="simulation", test_examples=4)
    summary = run_explain(cfg)
    explained = set()
    for layer in range(4):
        path = explanations_path(layer_dir(run / "transcoders" / SET, layer))
        if path.is_file():
            with ExplanationReader(path) as reader:
                explained |= {(layer, r["feature"]) for r in reader._rows("SELECT feature FROM done", [])}
    assert explained and explained <= wanted  # live latents of the graph only
    assert summary.n_explained == len(explained)
    assert "simulation auroc" in summary.report and "control" in summary.report
    assert run_explain(cfg).n_explained == 0  # resumes: nothing left
    assert main(["trace", "--run", str(run), "--prompt", "The cat", "--name", "cat", "--force", *keep_all]) == 0
    phrases = {}
    for layer in range(4):
        path = explanations_path(layer_dir(run / "transcoders" / SET, layer))
        if path.is_file():
            with ExplanationReader(path) as reader:
                rows = reader.labels([latent for lay, latent in wanted if lay == layer]).items()
                phrases |= {(layer, latent): explanation_phrase(row) for latent, row in rows}
    relabelled = [n for n in read_graph_json(run, "cat")["nodes"] if n["feature_type"] == "cross layer transcoder"]
    used = [n for n in relabelled if phrases.get((int(n["layer"]), int(n["node_id"].split("_")[1])))]
    assert used and all(
        n["clerp"].startswith(phrases[(int(n["layer"]), int(n["node_id"].split("_")[1]))] + " → promotes ")
        for n in used
    )
    with pytest.raises(ConfigError, match="no graph 'dog'"):
        run_explain(ExplainConfig(run=str(run), transcoders=SET, graphs="dog"))


def test_cached_mlp_inputs_give_the_same_index_as_the_live_model(tc_indexed, tmp_path, tiny_model_dir):
    import dataclasses

    from conftest import synthetic_corpus, tiny_cache_config

    from jobs.cache import run_cache

    live_run = tc_indexed[0]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(synthetic_corpus(4000), encoding="utf-8")  # the corpus of tiny_run: the same contexts
    run = tmp_path / "run"
    cache_cfg = dataclasses.replace(tiny_cache_config(run, tiny_model_dir, corpus), hooks="mlp-in", layers="all")
    run_cache(cache_cfg)
    shutil.copytree(live_run / "transcoders", run / "transcoders")
    for layer in range(4):
        (layer_dir(run / "transcoders" / SET, layer) / "features.duckdb").unlink()
    summary = tc_index.run_transcoder_index(config(run, tokens=32 * 200, layers="0,3"))
    assert summary.source == "cache"
    for layer in (0, 3):
        with (
            open_transcoder_index(run / "transcoders" / SET, layer) as cached,
            open_transcoder_index(live_run / "transcoders" / SET, layer) as live,
        ):
            sql = "SELECT context, tokens FROM contexts ORDER BY context"
            assert cached._rows(sql, []) == live._rows(sql, [])  # the same contexts, so comparable
            rows = [index._rows("SELECT * FROM features ORDER BY feature", []) for index in (cached, live)]
            assert [r["n_active"] for r in rows[0]] == [r["n_active"] for r in rows[1]]
            torch.testing.assert_close(
                torch.tensor([r["max_act"] for r in rows[0]]), torch.tensor([r["max_act"] for r in rows[1]])
            )
