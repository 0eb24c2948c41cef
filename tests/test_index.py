"""The feature index on a tiny model: exact bins, logit effects, queries, atomic rebuilds."""

import duckdb
import pytest
import torch

import jobs.index_writing as index_writing
from jobs.cli import main
from jobs.index import IndexConfig, run_index
from jobs.run import read_sae
from pipeline.features.decoder_geometry import logit_effects, nearest_by_decoder
from pipeline.lm.packing import special_mask
from storage.index_queries import FeatureIndex, FeatureIndexError
from storage.shards import iter_shards, read_manifest


def dense_codes(run):
    """Every ordinary token's dense code, computed independently of the index job."""
    sae, _ = read_sae(run / "saes" / "default")
    manifest = read_manifest(run / "activations")
    codes = []
    for shard in iter_shards(run / "activations", manifest):
        ordinary = ~special_mask(shard.tokens_CT, manifest.special_token_ids)
        codes.append(sae.encode(shard.activations_CTD[ordinary].float()).detach())
    return torch.cat(codes)


def test_statistics_match_dense_codes(indexed_run):
    run, path = indexed_run
    codes = dense_codes(run)
    con = duckdb.connect(str(path), read_only=True)
    n_active, max_act = zip(
        *con.execute("SELECT n_active, max_act FROM features ORDER BY feature").fetchall(), strict=True
    )
    assert list(n_active) == (codes > 0).sum(0).tolist()
    torch.testing.assert_close(torch.tensor(max_act), codes.max(0).values)
    for kind in ("width", "quantile"):
        sums = dict(
            con.execute(
                "SELECT feature, sum(n_activations) FROM interval_bins WHERE kind = ? GROUP BY feature", [kind]
            ).fetchall()
        )
        assert all(sums[f] == n_active[f] for f in sums) and len(sums) == sum(n > 0 for n in n_active)
    largest_spread = con.execute(  # within each feature, across its quantile bins; then the worst feature
        "SELECT max(n) FROM (SELECT feature, max(n_activations) - min(n_activations) AS n "
        "FROM interval_bins WHERE kind = 'quantile' GROUP BY feature)"
    ).fetchone()[0]
    hist_total = dict(con.execute("SELECT feature, list_sum(counts) FROM histograms").fetchall())
    assert largest_spread <= 1
    assert all(hist_total[f] == n_active[f] for f in hist_total)


def ntile_sizes(n: int, bins: int) -> list[int]:
    """SQL ntile(bins) over n rows: the first n % bins buckets hold one row more; never an empty bucket."""
    return [n // bins + (b < n % bins) for b in range(min(n, bins))]


def test_quantile_bins_are_equal_count_slices_of_the_sorted_activations(indexed_run):
    """Per feature: bins 0..min(n, 8)-1, sizes as ntile gives them, bounds the first and last value of each slice."""
    run, path = indexed_run
    codes = dense_codes(run)
    con = duckdb.connect(str(path), read_only=True)
    rows = con.execute(
        "SELECT feature, bin, lower, upper, n_activations FROM interval_bins WHERE kind = 'quantile' "
        "ORDER BY feature, bin"
    ).fetchall()
    assert rows and max(r[1] for r in rows) == 7  # the builder's default of 8 bins is used somewhere
    checked = 0
    for feature in range(codes.shape[1]):
        values = codes[:, feature][codes[:, feature] > 0].sort().values
        mine = [r for r in rows if r[0] == feature]
        sizes = ntile_sizes(len(values), 8)
        assert [r[1] for r in mine] == list(range(len(sizes))) and [r[4] for r in mine] == sizes
        if not sizes:
            continue
        first = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        last = torch.tensor(sizes).cumsum(0) - 1
        torch.testing.assert_close(torch.tensor([r[2] for r in mine]), values[first])
        torch.testing.assert_close(torch.tensor([r[3] for r in mine]), values[last])
        checked += 1
    assert checked > 10


def test_equal_width_bin_counts_by_hand(indexed_run):
    run, path = indexed_run
    codes = dense_codes(run)
    con = duckdb.connect(str(path), read_only=True)
    feature = int((codes > 0).sum(0).argmax())
    values = codes[:, feature][codes[:, feature] > 0]
    bins = torch.clamp((values / values.max() * 8).floor().long(), max=7)
    expected = torch.bincount(bins, minlength=8).tolist()
    got = [
        n
        for (n,) in con.execute(
            "SELECT n_activations FROM interval_bins WHERE feature = ? AND kind = 'width' ORDER BY bin", [feature]
        ).fetchall()
    ]
    assert got == expected


def test_logit_effects_equal_an_independent_computation(tiny_model):
    W_dec = torch.randn(6, 32)
    gamma = tiny_model.model.norm.weight.detach()
    W_U = tiny_model.lm_head.weight.detach()
    up_v, up_i, down_v, down_i = logit_effects(W_dec, W_U, gamma, top_n=3, chunk=4)
    for f in range(6):
        effects = [(float((W_dec[f] * gamma) @ W_U[v]), v) for v in range(W_U.shape[0])]
        best = sorted(effects, reverse=True)[:3]
        worst = sorted(effects)[:3]
        assert up_i[f].tolist() == [v for _, v in best]
        assert down_i[f].tolist() == [v for _, v in worst]
        torch.testing.assert_close(up_v[f], torch.tensor([e for e, _ in best]), rtol=1e-4, atol=1e-5)


def test_neighbours_exclude_self_and_rank_by_cosine():
    W = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    cos, ids = nearest_by_decoder(W, top_n=2, chunk=3)
    assert ids[0].tolist() == [1, 2] and ids[3].tolist() == [2, 1]
    assert cos[0, 0] == pytest.approx(0.9 / (0.81 + 0.01) ** 0.5)


def test_queries_return_sensible_rows(indexed_run):
    run, path = indexed_run
    with FeatureIndex(path) as index:
        live = index.list_features(sort="max", dead=False, limit=3)
        assert [r["max_act"] for r in live] == sorted((r["max_act"] for r in live), reverse=True)
        feature = live[0]["feature"]
        summary = index.summary(feature)
        assert len(summary["promoted"]) == 10 and len(summary["neighbours"]) == 10
        top = index.top_examples(feature)
        assert 0 < len(top) <= 5 and top[0].activation == pytest.approx(summary["max_act"])
        assert all(e.acts[e.peak] == pytest.approx(e.activation) for e in top)
        assert len({e.context for e in top}) == len(top)
        bins = index.interval_examples(feature, "quantile")
        assert sum(b["n_activations"] for b in bins) == summary["n_active"]
        assert all(b["lower"] <= e.activation <= b["upper"] for b in bins for e in b["examples"])
        token = top[0].tokens[top[0].peak]
        assert feature in [r["feature"] for r in index.search_tokens(token)]
        page = index.list_features(sort="id", descending=False, limit=5, offset=10)
        assert [r["feature"] for r in page] == [10, 11, 12, 13, 14]
        assert index.overview()["n_features"] == 64


def test_feature_out_of_range_is_a_clear_error(indexed_run):
    _, path = indexed_run
    with (
        FeatureIndex(path) as index,
        pytest.raises(FeatureIndexError, match=r"feature 64 out of range: this SAE has 64 features \(0-63\)"),
    ):
        index.summary(64)


def test_killed_rebuild_leaves_the_old_index_readable(indexed_run, monkeypatch):
    run, path = indexed_run
    reader = FeatureIndex(path)
    before = reader.summary(3)

    def killed(*args, **kwargs):
        with FeatureIndex(path) as during:  # the old index still opens read-only mid-build
            assert during.summary(3) == before
        raise KeyboardInterrupt

    monkeypatch.setattr(index_writing, "nearest_by_decoder", killed)  # a step of finishing, after every code
    with pytest.raises(KeyboardInterrupt):
        run_index(IndexConfig(run=str(run), device="cpu", top_k=5, window=4))
    assert reader.summary(3) == before
    assert sorted(p.name for p in path.parent.iterdir() if "features" in p.name or "scratch" in p.name) == [
        "features.duckdb"
    ]
    reader.close()


def test_show_and_features_cli(indexed_run, capsys):
    run, _ = indexed_run
    assert main(["features", "--run", str(run), "--limit", "3", "--only", "live"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("\n") >= 4 and "top promoted tokens" in listing
    assert main(["show", "--run", str(run), "--feature", "3", "--intervals"]) == 0
    shown = capsys.readouterr().out
    assert "feature 3" in shown and "[[" in shown and "promotes:" in shown
    assert main(["show", "--run", str(run), "--feature", "999"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_a_token_every_direction_pushes_tops_no_standardized_list():
    from pipeline.features.decoder_geometry import logit_effect_rankings

    generator = torch.Generator().manual_seed(0)
    W_dec = torch.randn(60, 8, generator=generator)
    W_dec[:, 0] = 3.0  # every direction shares e0 equally
    W_U = torch.randn(30, 8, generator=generator)
    W_U[0] = 0.0
    W_U[0, 0] = 20.0  # token 0 responds to e0: the largest raw effect on every feature
    raw_top = logit_effects(W_dec, W_U, None, top_n=3)[1]
    assert (raw_top[:, 0] == 0).all()
    raw_ranking, effects = logit_effect_rankings(W_dec, W_U, None, top_n=3, chunk=7)
    for got, expected in zip(raw_ranking, logit_effects(W_dec, W_U, None, top_n=3, chunk=7), strict=True):
        assert torch.equal(got, expected)  # the one-pass raw ranking equals the raw-only function
    assert not (effects["promoted_ids"] == 0).any()
    raw = W_dec @ W_U.T  # brute force: z-scores over features, per token
    z = (raw - raw.mean(0)) / raw.std(0, unbiased=False).clamp_min(1e-8)  # token 0: exactly 0 spread
    best = z.topk(3, dim=1)
    assert torch.equal(effects["promoted_ids"], best.indices)
    torch.testing.assert_close(effects["promoted_z"], best.values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(effects["promoted_raw"], raw.gather(1, best.indices))
    assert torch.equal(effects["suppressed_ids"], z.topk(3, dim=1, largest=False).indices)
