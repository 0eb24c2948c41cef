"""Interventions on transcoder features from a graph: exact MLP-output edits on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from pipeline.lm.hook_points import mlp_module
from pipeline.lm.hooks import decoder_blocks
from pipeline.sae.model import SaeConfig
from pipeline.sae.transcoder import Transcoder
from pipeline.steering.generation import SamplingConfig, sample
from pipeline.tracing.intervention import FeatureEdit, intervene, last_logits, run_intervention, top_tokens
from tests.conftest import make_tiny_llama
from tests.test_tracing import with_random_norm_weights

D_MODEL, N_FEATURES = 32, 48
PROMPT = [1, 10, 11, 12, 13, 14, 15]


@pytest.fixture(scope="module")
def model():
    return with_random_norm_weights(make_tiny_llama(vocab_size=64, n_layers=3, d_model=D_MODEL, seed=0))


def random_transcoder(seed: int, arch: str = "relu") -> Transcoder:
    torch.manual_seed(seed)
    tc = Transcoder(SaeConfig(D_MODEL, N_FEATURES, arch, k=4))
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_(0, 0.3)
    return tc.eval()


@pytest.fixture(scope="module")
def transcoders():
    return {1: random_transcoder(1), 2: random_transcoder(2, "topk")}


def mlp_io(model, layer: int, ids: list[int], edits=(), transcoders=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(MLP input, MLP output as the block adds it) at ``layer`` [T, D], with ``edits`` attached."""
    seen = {}
    mlp = mlp_module(decoder_blocks(model)[layer])
    pre = mlp.register_forward_pre_hook(lambda _m, inputs: seen.__setitem__("x", inputs[0][0].clone()))
    try:
        if edits:
            with intervene(model, transcoders, edits):
                post = mlp.register_forward_hook(lambda _m, _i, out: seen.__setitem__("y", out[0].clone()))
                last_logits(model, ids)
        else:
            post = mlp.register_forward_hook(lambda _m, _i, out: seen.__setitem__("y", out[0].clone()))
            last_logits(model, ids)
    finally:
        pre.remove()
        post.remove()
    return seen["x"], seen["y"]


@torch.no_grad()
def active_feature(tc: Transcoder, x_TD: torch.Tensor, position: int) -> tuple[int, float]:
    acts_F = tc.encode(x_TD[position : position + 1])[0]
    feature = int(acts_F.argmax())
    return feature, float(acts_F[feature])


def test_clamping_to_its_own_activation_changes_nothing(model, transcoders):
    x, _ = mlp_io(model, 1, PROMPT)
    feature, act = active_feature(transcoders[1], x, 3)
    assert act > 0
    clean = last_logits(model, PROMPT)
    with intervene(model, transcoders, [FeatureEdit(1, 3, feature, act)]):
        edited = last_logits(model, PROMPT)
    torch.testing.assert_close(edited, clean, rtol=0, atol=1e-6)


def test_ablating_moves_the_mlp_output_at_exactly_that_position(model, transcoders):
    tc = transcoders[1]
    x, y_clean = mlp_io(model, 1, PROMPT)
    feature, act = active_feature(tc, x, 4)
    _, y_edited = mlp_io(model, 1, PROMPT, [FeatureEdit(1, 4, feature, 0.0)], transcoders)
    expected = torch.zeros_like(y_clean)
    expected[4] = -act * tc.W_dec[feature].detach()
    torch.testing.assert_close(y_edited - y_clean, expected, rtol=1e-5, atol=1e-5)


def test_a_downstream_activation_is_read_from_the_edited_input(model, transcoders):
    """Edit layer 1, clamp layer 2: layer 2's delta uses a_f recomputed on its changed MLP input."""
    x2_clean, _ = mlp_io(model, 2, PROMPT)
    f1, a1 = active_feature(transcoders[1], mlp_io(model, 1, PROMPT)[0], 5)
    f2, _ = active_feature(transcoders[2], x2_clean, 5)
    edits = [FeatureEdit(1, 5, f1, 3 * a1), FeatureEdit(2, 5, f2, 1.5)]
    x2_edited, y2_edited = mlp_io(model, 2, PROMPT, edits, transcoders)
    assert not torch.allclose(x2_edited[5], x2_clean[5])
    mlp = mlp_module(decoder_blocks(model)[2])
    with torch.no_grad():
        plain = mlp(x2_edited.unsqueeze(0))[0]
        a_now = transcoders[2].encode(x2_edited[5:6])[0, f2]
    expected = plain.clone()
    expected[5] += (1.5 - a_now) * transcoders[2].W_dec[f2]
    torch.testing.assert_close(y2_edited, expected, rtol=1e-5, atol=1e-5)


def test_generation_runs_and_the_original_side_is_the_plain_model(model, transcoders):
    x, _ = mlp_io(model, 1, PROMPT)
    feature, act = active_feature(transcoders[1], x, len(PROMPT) - 1)
    result = run_intervention(model, transcoders, [FeatureEdit(1, len(PROMPT) - 1, feature, 50 * act)], PROMPT,
                              k=5, max_new_tokens=6)  # fmt: skip
    assert result.original_top == top_tokens(last_logits(model, PROMPT), 5)
    assert len(result.original_ids) == len(result.edited_ids) == 6
    assert result.edited_top != result.original_top


def test_decode_steps_under_a_kv_cache_are_untouched(model, transcoders):
    x, _ = mlp_io(model, 1, PROMPT)
    feature, act = active_feature(transcoders[1], x, 2)
    deltas = []
    with intervene(model, transcoders, [FeatureEdit(1, 2, feature, 0.0)], lambda _layer, d: deltas.append(d)):
        sample(model, PROMPT, SamplingConfig(max_new_tokens=4, temperature=0.0), None)
    assert [d.shape[1] for d in deltas] == [len(PROMPT), 1, 1, 1]
    assert deltas[0][0, 2].abs().sum() > 0 and deltas[0][0, torch.arange(len(PROMPT)) != 2].abs().sum() == 0
    assert all(d.abs().sum() == 0 for d in deltas[1:])


def test_an_edit_without_a_position_steers_every_position_generated_ones_too(model, transcoders):
    tc = transcoders[1]
    x, y_clean = mlp_io(model, 1, PROMPT)
    feature = int(tc.W_dec.detach().norm(dim=1).argmax())
    _, y_edited = mlp_io(model, 1, PROMPT, [FeatureEdit(1, None, feature, 2.0)], transcoders)
    with torch.no_grad():
        expected = y_clean + (2.0 - tc.encode(x)[:, feature]).unsqueeze(1) * tc.W_dec[feature]
    torch.testing.assert_close(y_edited, expected, rtol=1e-5, atol=1e-5)
    deltas = []
    with intervene(model, transcoders, [FeatureEdit(1, None, feature, 2.0)], lambda _layer, d: deltas.append(d)):
        sample(model, PROMPT, SamplingConfig(max_new_tokens=3, temperature=0.0), None)
    assert [d.shape[1] for d in deltas] == [len(PROMPT), 1, 1]
    assert all(bool((d.abs().sum(-1) > 0).all()) for d in deltas)  # every position, each decode step included


@pytest.mark.parametrize(
    ("edit", "message"),
    [(FeatureEdit(0, 1, 0), "no transcoder at layer 0"), (FeatureEdit(1, 1, 99), "out of range"),
     (FeatureEdit(1, 40, 0), "the prompt has 7 tokens")],
)  # fmt: skip
def test_bad_edits_are_errors_that_say_what(model, transcoders, edit, message):
    with pytest.raises(ValueError, match=message):
        run_intervention(model, transcoders, [edit], PROMPT, max_new_tokens=1)
