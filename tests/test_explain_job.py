"""`saescope explain` on the tiny indexed run: splits, negatives, resume, settings, report, search, bad input."""

import duckdb
import numpy as np
import pytest
import torch

import storage.explanations as explanations_store
from jobs.cli import main
from jobs.explain import ExplainConfig, run_explain
from jobs.run import read_sae
from pipeline.explain.examples import ExampleRows, ExampleSource, WindowMaker
from pipeline.lm.packing import special_mask
from storage.explanations import ExplanationReader, explanations_path
from storage.index_queries import FeatureIndex
from storage.shards import iter_shards, read_manifest


def code_grid(run) -> torch.Tensor:
    """Dense codes [context, position, feature] of every cached token (zero on special tokens), by brute force."""
    sae, _ = read_sae(run / "saes" / "default")
    manifest = read_manifest(run / "activations")
    grids = []
    for shard in iter_shards(run / "activations", manifest):
        codes = sae.encode(shard.activations_CTD.float()).detach()
        grids.append(codes * ~special_mask(shard.tokens_CT, manifest.special_token_ids)[..., None])
    return torch.cat(grids)


def source_of(run) -> tuple[ExampleSource, FeatureIndex]:
    index = FeatureIndex(run / "saes" / "default" / "features.duckdb")
    inputs = index.explanation_inputs()
    maker = WindowMaker(inputs["context_ids"], inputs["tokens_CT"], index.window)
    pool, firing, hard = inputs["pool"], inputs["firing"], inputs["hard"]
    source = ExampleSource(
        ExampleRows(**inputs["rows"]), maker, pool["context"], pool["position"], firing["slot"],
        firing["feature"], hard["feature"], hard["context"], hard["position"],
    )  # fmt: skip
    return source, index


def window_max(grid, keys, feature, radius, ctx_len) -> np.ndarray:
    out = []
    for key in keys.tolist():
        c, p = divmod(key, ctx_len)
        out.append(float(grid[c, max(0, p - radius) : p + radius + 1, feature].max()))
    return np.array(out)


def test_examples_split_and_negatives_match_brute_force(indexed_run):
    run, _ = indexed_run
    grid = code_grid(run)
    source, index = source_of(run)
    ctx_len, radius = index.ctx_len, index.window
    checked_hard = 0
    for feature in source.features():
        examples = source.for_feature(feature, n_train=6, n_test=6)
        train_ctx = set((examples.train.keys_E // ctx_len).tolist())
        test_ctx = set((examples.positives.keys_E // ctx_len).tolist())
        assert not train_ctx & test_ctx, "train and test share a context"
        assert len(examples.random_negatives) + len(examples.hard_negatives) == len(examples.positives)
        # Activating test windows fire at their centre; the stored per-token activations are the true ones.
        for keys, acts in ((examples.positives.keys_E, examples.positives.acts_EW),):
            for key, row in zip(keys.tolist(), acts, strict=True):
                c, p = divmod(key, ctx_len)
                assert grid[c, p, feature] > 0
                lo = p - radius
                truth = [float(grid[c, q, feature]) if 0 <= q < ctx_len else 0.0 for q in range(lo, p + radius + 1)]
                np.testing.assert_allclose(row, truth, rtol=1e-5, atol=1e-6)
        for negatives in (examples.random_negatives, examples.hard_negatives):
            assert (window_max(grid, negatives.keys_E, feature, radius, ctx_len) == 0).all()
        checked_hard += len(examples.hard_negatives)
    assert checked_hard > 0
    # The pool's firing list is exactly the features non-zero within +-window of each pool window.
    con = duckdb.connect(str(index.path), read_only=True)
    pool = con.execute("SELECT slot, context, position FROM negative_pool ORDER BY slot").fetchall()
    firing = {}
    for slot, feature in con.execute("SELECT slot, feature FROM pool_firing").fetchall():
        firing.setdefault(slot, set()).add(feature)
    for slot, c, p in pool[:200]:
        truth = set(torch.nonzero(grid[c, max(0, p - radius) : p + radius + 1].amax(0) > 0).flatten().tolist())
        assert firing.get(slot, set()) == truth
    index.close()


def explain_cfg(run, **overrides) -> ExplainConfig:
    options = {"test_examples": 6, "examples": 8, "embed_examples": 3, "batch_features": 16, **overrides}
    return ExplainConfig(run=str(run), **options)


def table(path, sql):
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_explain_resume_rerun_and_new_settings(indexed_copy, monkeypatch, tmp_path):
    import shutil

    clean_copy = tmp_path / "clean"
    shutil.copytree(indexed_copy, clean_copy)
    live = table(indexed_copy / "saes/default/features.duckdb", "SELECT count(*) FROM features WHERE NOT dead")[0][0]
    calls = {"n": 0}
    insert = explanations_store.ExplanationStore._insert
    sae_folder = indexed_copy / "saes" / "default"

    def killed_while_publishing_the_second_batch(self, con, batch):
        calls["n"] += 1
        if calls["n"] < 2:
            return insert(self, con, batch)
        first_table = next(iter(batch.rows))
        partial = explanations_store.ExplanationBatch({first_table: batch.rows[first_table]})
        insert(self, con, partial)  # some of the batch's rows are in the temp copy ...
        con.execute("CHECKPOINT")
        (temp,) = sae_folder.glob(".explanations.duckdb.*.tmp")
        shutil.copyfile(temp, sae_folder / ".explanations.duckdb.1.tmp")  # ... and stay there, as after SIGKILL
        raise KeyboardInterrupt  # before the rename that would publish them

    monkeypatch.setattr(explanations_store.ExplanationStore, "_insert", killed_while_publishing_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_explain(explain_cfg(indexed_copy))
    path = explanations_path(sae_folder)
    assert calls["n"] == 2 and (sae_folder / ".explanations.duckdb.1.tmp").is_file()
    assert table(path, "SELECT count(*) FROM done")[0][0] == 16  # the first batch survived, whole
    assert table(path, "SELECT count(DISTINCT feature) FROM explanations")[0][0] == 16  # nothing of the second
    monkeypatch.setattr(explanations_store.ExplanationStore, "_insert", insert)
    resumed = run_explain(explain_cfg(indexed_copy))
    assert resumed.n_done_before == 16 and resumed.n_explained == live - 16
    assert not list(sae_folder.glob(".explanations.duckdb.*.tmp*"))  # the dead job's temp copy is gone
    run_explain(explain_cfg(clean_copy))
    for sql in ("SELECT * FROM explanations ORDER BY ALL", "SELECT * FROM scores ORDER BY ALL"):
        assert table(path, sql) == table(explanations_path(clean_copy / "saes" / "default"), sql)
    assert "simulation auroc" in resumed.report and "control" in resumed.report
    first = table(path, "SELECT * FROM scores ORDER BY ALL")
    assert table(path, "SELECT count(DISTINCT feature) FROM explanations")[0][0] == live
    again = run_explain(explain_cfg(indexed_copy))
    assert again.n_explained == 0 and table(path, "SELECT * FROM scores ORDER BY ALL") == first
    run_explain(explain_cfg(indexed_copy, scorers="simulation", test_examples=4))
    scores = table(path, "SELECT test_hash, count(*) FROM scores GROUP BY test_hash")
    assert len(scores) == 2  # the new test setting added rows; the old rows are untouched
    assert set(first) <= set(table(path, "SELECT * FROM scores ORDER BY ALL"))
    # Predictions are kept per example for auditing: the stored AUROC is recomputed from them.
    from pipeline.explain.metrics import auroc

    rows = table(
        path,
        """SELECT p.labels, p.predictions, s.value FROM predictions p JOIN scores s
           ON s.explanation_id = p.explanation_id AND s.scorer = p.scorer AND s.test_hash = p.test_hash
           WHERE s.metric = 'auroc' AND NOT p.control""",
    )
    for labels, predictions, value in rows:
        assert auroc(predictions, labels) == pytest.approx(value)


def test_explain_is_deterministic(indexed_copy, tmp_path):
    import shutil

    other = tmp_path / "second"
    shutil.copytree(indexed_copy, other)
    run_explain(explain_cfg(indexed_copy))
    run_explain(explain_cfg(other))
    sql = "SELECT feature, text, tokens FROM explanations ORDER BY feature"
    assert table(explanations_path(indexed_copy / "saes/default"), sql) == table(
        explanations_path(other / "saes/default"), sql
    )


def test_query_show_and_labels(indexed_copy, capsys):
    assert main(["explain", "--run", str(indexed_copy), "--test-examples", "6", "--embed-examples", "3"]) == 0
    out = capsys.readouterr().out
    assert "median" in out and "best explained" in out and "worst explained" in out
    assert main(["features", "--run", str(indexed_copy), "--query", "words", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "similarity" in out and out.count("\n") >= 4
    with ExplanationReader(explanations_path(indexed_copy / "saes/default")) as reader:
        feature = next(iter(reader.labels(list(range(64)))))
    assert main(["show", "--run", str(indexed_copy), "--feature", str(feature)]) == 0
    assert "explanation (tokens" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--features", "abc"], "--features 'abc' is not all"),
        (["--features", "9-2"], "A <= B"),
        (["--features", "999"], "this SAE has 64 features"),
        (["--scorers", "simulation,vibes"], "unknown scorer vibes"),
        (["--radius", "9"], "exceeds the index's window"),
        (["--llm", "openai:"], "needs the server's base URL"),
    ],
)
def test_bad_explain_input_is_one_line(indexed_copy, capsys, args, message):
    assert main(["explain", "--run", str(indexed_copy), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert not explanations_path(indexed_copy / "saes/default").exists()


def test_query_without_explanations_says_what_to_do(indexed_copy, capsys):
    assert main(["features", "--run", str(indexed_copy), "--query", "numbers"]) == 2
    assert "run `saescope explain" in capsys.readouterr().err
