"""Comparing SAEs: Hungarian matching by decoder cosine, PW-MCC and its control, correlations, split families,
the `saescope compare` verb and the dashboard's Compare page."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from pipeline.features.matching import (
    PairCorrelation,
    control_pw_mcc,
    decoder_cosines,
    match_decoders,
    matched_correlation,
    mean_row_cosine,
    random_decoder,
    split_families,
    splits_between,
    unit_rows,
)
from pipeline.sae.model import Sae, SaeConfig


def _unit(*rows) -> torch.Tensor:
    return unit_rows(torch.tensor(rows, dtype=torch.float32))


def test_identical_decoders_match_themselves_with_pw_mcc_one():
    W_FD = torch.randn(12, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    matching = match_decoders(W_FD, W_FD)
    assert matching.idx_a_P.tolist() == list(range(12))
    assert matching.idx_b_P.tolist() == list(range(12))
    assert matching.pw_mcc == pytest.approx(1.0, abs=1e-6)


def test_a_permuted_and_rescaled_decoder_is_recovered():
    gen = torch.Generator().manual_seed(1)
    W_a_FD = torch.randn(10, 8, generator=gen, dtype=torch.float32)
    perm = torch.randperm(10, generator=gen)
    W_b_FD = W_a_FD[perm] * torch.rand(10, 1, generator=gen, dtype=torch.float32).add(0.5)
    matching = match_decoders(W_a_FD, W_b_FD)
    assert matching.idx_b_P.tolist() == perm.argsort().tolist()
    assert matching.pw_mcc == pytest.approx(1.0, abs=1e-6)


def test_three_by_three_case_by_hand_beats_greedy():
    # b is the identity, so cos[i, j] is coordinate j of a's unit row i:
    #   [[0.9, 0.436, 0], [0.8, 0, 0.6], [0, 0.6, 0.8]]
    # greedy takes 0.9, then 0.8, then 0 (sum 1.7); the best assignment is 0.9 + 0.6 + 0.6 = 2.1.
    W_a_FD = _unit([0.9, math.sqrt(0.19), 0.0], [0.8, 0.0, 0.6], [0.0, 0.6, 0.8])
    matching = match_decoders(W_a_FD, torch.eye(3, dtype=torch.float32))
    assert matching.idx_b_P.tolist() == [0, 2, 1]
    assert matching.cos_P.tolist() == pytest.approx([0.9, 0.6, 0.6], abs=1e-6)
    assert matching.pw_mcc == pytest.approx(0.7, abs=1e-6)
    assert matching.count_at_least(0.7) == 1


@pytest.mark.parametrize("a_smaller", [True, False])
def test_rectangular_matching_pairs_every_latent_of_the_smaller_sae(a_smaller):
    small_FD = _unit([0.0, 0.8, 0.6], [1.0, 0.0, 0.0])
    large_FD = torch.eye(3, dtype=torch.float32)
    if a_smaller:
        matching = match_decoders(small_FD, large_FD)
        pairs = list(zip(matching.idx_a_P.tolist(), matching.idx_b_P.tolist(), strict=True))
        assert pairs == [(0, 1), (1, 0)]
    else:
        matching = match_decoders(large_FD, small_FD)
        pairs = list(zip(matching.idx_a_P.tolist(), matching.idx_b_P.tolist(), strict=True))
        assert pairs == [(0, 1), (1, 0)]
    assert matching.cos_P.tolist() == pytest.approx([0.8, 1.0] if a_smaller else [1.0, 0.8], abs=1e-6)


def test_chunked_cosines_equal_the_unchunked_ones():
    gen = torch.Generator().manual_seed(2)
    W_a_FD = torch.randn(11, 5, generator=gen, dtype=torch.float32)
    W_b_FD = torch.randn(7, 5, generator=gen, dtype=torch.float32)
    oracle_AB = torch.nn.functional.cosine_similarity(W_a_FD[:, None, :], W_b_FD[None, :, :], dim=-1)
    for block_rows in (1, 3, 11, 64):
        assert torch.allclose(decoder_cosines(W_a_FD, W_b_FD, block_rows=block_rows), oracle_AB, atol=1e-6)


def test_a_split_feature_is_found_with_its_children_most_similar_first():
    W_a_FD = _unit([1, 0, 0, 0], [0, 1, 0, 0])
    # b splits a's latent 0 into two directions (cos 0.819 and 0.894) and keeps one at cos 0.69 out
    W_b_FD = _unit([1, 0, -0.7, 0], [1, 0, 0.5, 0], [0, 1, 0, 0], [0.69, 0, 0, math.sqrt(1 - 0.69**2)])
    families = split_families(W_a_FD, W_b_FD, threshold=0.7, block_rows=1)
    assert [(f.parent, f.children) for f in families] == [(0, (1, 0))]
    assert families[0].cosines == pytest.approx((1 / math.sqrt(1.25), 1 / math.sqrt(1.49)), abs=1e-6)
    assert splits_between(W_b_FD, W_a_FD).parent_side == "b"
    assert [f.parent for f in splits_between(W_b_FD, W_a_FD).families] == [0]


def test_streamed_correlation_equals_numpy_corrcoef():
    rng = np.random.default_rng(3)
    u_NP = rng.standard_normal((300, 4)).astype(np.float32)
    v_NP = (0.5 * u_NP + rng.standard_normal((300, 4))).astype(np.float32)
    u_NP[:, 3] += 1000.0  # a large mean: naive sums of squares lose the variance in float32
    acc = PairCorrelation(4)
    for lo, hi in ((0, 100), (100, 137), (137, 300)):
        acc.update(torch.from_numpy(u_NP[lo:hi]), torch.from_numpy(v_NP[lo:hi]))
    expected = [np.corrcoef(u_NP[:, p].astype(np.float64), v_NP[:, p].astype(np.float64))[0, 1] for p in range(4)]
    assert acc.n_tokens == 300
    assert acc.result().tolist() == pytest.approx(expected, abs=1e-5)


def test_a_pair_with_a_silent_latent_has_no_correlation():
    acc = PairCorrelation(2)
    u_NP = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 4.0]], dtype=torch.float32)
    acc.update(u_NP, torch.tensor([[1.0, 2.0], [0.0, 4.0], [3.0, 8.0]], dtype=torch.float32))
    corr_P = acc.result()
    assert math.isnan(corr_P[0]) and corr_P[1] == pytest.approx(1.0, abs=1e-9)


def _permuted_copy(sae: Sae, perm: torch.Tensor) -> Sae:
    copy = Sae(sae.cfg)
    with torch.no_grad():
        copy.W_enc_FD.copy_(sae.W_enc_FD[perm])
        copy.b_enc.copy_(sae.b_enc[perm])
        copy.W_dec.copy_(sae.W_dec[perm])
        copy.b_dec.copy_(sae.b_dec)
    return copy


def test_a_permuted_sae_matches_with_correlation_one():
    sae_a = Sae(SaeConfig(d_in=8, d_sae=16, architecture="topk", k=4)).initialize(torch.Generator().manual_seed(4))
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(5))
    sae_b = _permuted_copy(sae_a, perm)
    matching = match_decoders(sae_a.W_dec, sae_b.W_dec)
    assert matching.idx_b_P.tolist() == perm.argsort().tolist()
    batches = torch.randn(500, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float32).split(64)
    corr_P, n_tokens = matched_correlation(sae_a, sae_b, matching, batches, max_tokens=300)
    assert n_tokens == 300
    fired = ~torch.isnan(corr_P)
    assert fired.sum() > 8 and torch.allclose(corr_P[fired], torch.ones(int(fired.sum()), dtype=torch.float64))


def test_the_control_is_a_seeded_untrained_sae_of_the_same_shape():
    cfg = SaeConfig(d_in=16, d_sae=48, architecture="topk", k=4)
    W_FD = random_decoder(cfg, seed=0)
    assert W_FD.shape == (48, 16) and torch.allclose(W_FD.norm(dim=1), torch.ones(48), atol=1e-5)
    assert torch.equal(W_FD, random_decoder(cfg, seed=0)) and not torch.equal(W_FD, random_decoder(cfg, seed=1))
    control = control_pw_mcc(random_decoder(cfg, seed=7), cfg, seed=0)
    best_single_AB = decoder_cosines(random_decoder(cfg, seed=7), W_FD).max(1).values.mean()
    assert 0.0 < control <= float(best_single_AB) + 1e-6


@pytest.mark.parametrize("architecture", ["topk", "relu"])
def test_random_decoder_is_the_initialization_training_starts_from(architecture):
    from pipeline.sae.initialization import init_sae

    cfg = SaeConfig(d_in=8, d_sae=24, architecture=architecture, k=4)
    sample_ND = torch.randn(32, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float32)
    start = init_sae(cfg, sample_ND, seed=3)
    assert mean_row_cosine(start.W_dec, random_decoder(cfg, seed=3)) == pytest.approx(1.0, abs=1e-6)
    assert mean_row_cosine(start.W_dec, random_decoder(cfg, seed=4)) < 0.5


@pytest.fixture(scope="module")
def two_sae_run(indexed_run, tmp_path_factory):
    """The indexed tiny run plus a second, larger SAE ``other`` (128 latents, seed 1), compared once."""
    from jobs.cli import main
    from jobs.train import run_train
    from jobs.training.config import TrainJobConfig

    run = tmp_path_factory.mktemp("compare") / "run"
    shutil.copytree(indexed_run[0], run)
    run_train(
        TrainJobConfig(
            run=str(run), name="other", d_sae=128, k=4, seed=1, tokens=256 * 24, batch_size=256,
            lm_eval_contexts=0, device="cpu", dtype="float32",
        )
    )  # fmt: skip
    assert main(["compare", "--run", str(run), "--sae", "default", "--sae", "other", "--heldout-tokens", "500"]) == 0
    return run


def test_compare_prints_pw_mcc_beside_its_control_and_saves_the_pairs(two_sae_run, capsys):
    from jobs.cli import main

    assert main(["compare", "--run", str(two_sae_run), "--sae", "default", "--sae", "other", "--no-save"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"PW-MCC (-?[\d.]+)\s+control (-?[\d.]+)", out)
    assert found, out
    saved = json.loads((two_sae_run / "comparisons" / "default__other.json").read_text())
    assert float(found[1]) == pytest.approx(saved["pw_mcc"], abs=1e-3)
    assert float(found[2]) == pytest.approx(saved["control_pw_mcc"], abs=1e-3)
    assert len(saved["pairs"]["a"]) == 64 and len(set(saved["pairs"]["b"])) == 64
    assert saved["splits"]["parent_side"] == "a" and "split families" in out
    corr = saved["correlation"]
    assert 0 < corr["n_tokens"] <= 500 and len(corr["per_pair"]) == 64
    assert saved["a"]["training_seed"] == 0 and saved["b"]["training_seed"] == 1
    assert -1 <= saved["b"]["cosine_with_init"] <= 1 and "own initialization" in out


def test_compare_against_the_same_sae_in_another_run_agrees(two_sae_run, tmp_path, capsys):
    from jobs.cli import main

    other = tmp_path / "other-run"
    shutil.copytree(two_sae_run, other)
    argv = ["compare", "--run", str(two_sae_run), "--sae", "default", "--against", f"{other}:other", "--json"]
    assert main([*argv, "--no-save", "--heldout-tokens", "500"]) == 0
    result = json.loads(capsys.readouterr().out)
    saved = json.loads((two_sae_run / "comparisons" / "default__other.json").read_text())
    assert result["pw_mcc"] == pytest.approx(saved["pw_mcc"], abs=1e-6)
    assert result["pairs"]["b"] == saved["pairs"]["b"]
    assert result["b"]["label"] == f"{other}:other"


def test_compare_refuses_runs_of_different_models(two_sae_run, tmp_path, capsys):
    from jobs.cli import main

    other = tmp_path / "other-run"
    shutil.copytree(two_sae_run, other)
    manifest_path = other / "activations" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["provenance"]["model"]["revision"] = "sha256:" + "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    assert main(["compare", "--run", str(two_sae_run), "--sae", "default", "--against", f"{other}:other"]) == 2
    err = capsys.readouterr().err
    assert "cache different models" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sae", "default"], "give two SAEs"),
        (["--sae", "default", "--sae", "default"], "given twice"),
        (["--sae", "default", "--against", "nocolon"], "must be RUN:NAME"),
        (["--sae", "default", "--sae", "other", "--against", "x:y"], "at most one --sae"),
        (["--sae", "default", "--sae", "nope"], "no trained SAE named 'nope'"),
        (["--sae", "default", "--sae", "other", "--control-seed", "1"], "no random control"),
    ],
)
def test_bad_pairs_are_one_line_errors(two_sae_run, capsys, extra, message):
    from jobs.cli import main

    assert main(["compare", "--run", str(two_sae_run), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def _compare_page(run, monkeypatch, **query):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("SAESCOPE_RUN", str(run))
    app = AppTest.from_string("from dashboards.views import compare\ncompare.render()\n", default_timeout=120)
    for key, value in query.items():
        app.query_params[key] = value
    return app.run()


@pytest.mark.parametrize(("a", "b"), [("default", "other"), ("other", "default")])
def test_compare_page_lists_matched_pairs_with_links_to_both_saes(two_sae_run, monkeypatch, a, b):
    app = _compare_page(two_sae_run, monkeypatch, a=a, b=b)
    assert not app.exception
    metrics = {m.label: m.value for m in app.metric}
    saved = json.loads((two_sae_run / "comparisons" / "default__other.json").read_text())
    assert metrics["PW-MCC"] == f"{saved['pw_mcc']:.3f}" and metrics["control"] == f"{saved['control_pw_mcc']:.3f}"
    pairs = app.dataframe[0].value
    assert len(pairs) == 64 and pairs["cosine"].is_monotonic_decreasing
    assert pairs["A"].str.fullmatch(rf"\./feature\?id=\d+&sae={a}").all()
    assert pairs["B"].str.fullmatch(rf"\./feature\?id=\d+&sae={b}").all()
    best = saved["pairs"]["cosine"].index(max(saved["pairs"]["cosine"]))
    first_a, first_b = saved["pairs"]["a"][best], saved["pairs"]["b"][best]
    expected = (first_a, first_b) if a == "default" else (first_b, first_a)
    assert pairs["A"][0] == f"./feature?id={expected[0]}&sae={a}"
    assert pairs["B"][0] == f"./feature?id={expected[1]}&sae={b}"


def test_compare_page_without_a_saved_comparison_shows_the_command(two_sae_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(two_sae_run, run, ignore=shutil.ignore_patterns("comparisons"))
    app = _compare_page(run, monkeypatch, a="default", b="other")
    assert not app.exception and not app.dataframe
    assert "saescope compare" in app.code[0].value and "--sae other" in app.code[0].value


def test_split_families_table_keeps_labels_as_plain_cells():
    from dashboards.views.compare import family_rows

    result = {
        "a": {"name": "small"},
        "b": {"name": "large"},
        "splits": {"parent_side": "a", "families": [{"parent": 3, "children": [7, 9], "cosines": [0.91, 0.72]}]},
    }
    frame = family_rows(result, {3: "<b>cats</b>"}, {7: "tabby", 9: "kittens"})
    assert frame.to_dict("records") == [
        {
            "parent": "./feature?id=3&sae=small",
            "parent label": "<b>cats</b>",
            "size": 2,
            "children in large": "#7 (0.91) tabby · #9 (0.72) kittens",
        }
    ]
