"""Interventions on cross-layer transcoder features: an edit changes the feature's writes into every later layer.

The oracle recomputes each MLP output by hand, in float64: the CLT's reconstruction (its eager
dense ``decode``) with the edited codes set to their values, plus the live error (MLP output minus
the unedited reconstruction), from MLP inputs recorded in the same forward pass.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from pipeline.lm.hook_points import replace_mlp_out
from pipeline.sae.cross_layer import CltConfig
from pipeline.steering.generation import SamplingConfig, sample
from pipeline.tracing.intervention import FeatureEdit, intervene, run_intervention
from tests.conftest import make_tiny_llama
from tests.test_cross_layer import random_clt
from tests.test_tracing import with_random_norm_weights

N_LAYERS, D, F = 4, 32, 16
PROMPT = [1, 10, 11, 12, 13, 14, 15]


@pytest.fixture(scope="module")
def model():
    return with_random_norm_weights(make_tiny_llama(vocab_size=64, n_layers=N_LAYERS, d_model=D, seed=0)).double()


@pytest.fixture(scope="module", params=[False, True], ids=["no-skip", "skip"])
def clt(request):
    return random_clt(CltConfig(N_LAYERS, D, F, "relu", skip=request.param), seed=5, dec_scale=0.05)


@pytest.fixture(scope="module")
def views(clt):
    return {layer: clt.layer_view(layer) for layer in range(N_LAYERS)}


@torch.no_grad()
def logits64(model, ids: list[int]) -> torch.Tensor:
    """The last position's logits [V] in float64 (``last_logits`` rounds to float32)."""
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]


def codes_by_layer(model, clt, ids: list[int]) -> torch.Tensor:
    """Dense codes [L, T, F] of the unedited prompt."""
    inputs = {}

    def keep(layer: int):
        return lambda x_BTD, out_BTD: inputs.__setitem__(layer, x_BTD[0]) or out_BTD

    with ExitStack() as stack:
        for layer in range(N_LAYERS):
            stack.enter_context(replace_mlp_out(model, layer, keep(layer)))
        logits64(model, ids)
    with torch.no_grad():
        return clt.encode(torch.stack([inputs[layer] for layer in range(N_LAYERS)]))


@torch.no_grad()
def oracle_logits(model, clt, ids: list[int], edits: list[FeatureEdit]) -> torch.Tensor:
    """The model's last logits with MLP o's output = decode(edited codes)[o] + (MLP out - decode(codes)[o])."""
    inputs: dict[int, torch.Tensor] = {}

    def splice(layer: int):
        def fn(x_BTD, out_BTD):
            inputs[layer] = x_BTD[0]
            x_LTD = torch.stack([inputs.get(i, torch.zeros_like(x_BTD[0])) for i in range(N_LAYERS)])
            codes_LTF = clt.encode(x_LTD)
            edited_LTF = codes_LTF.clone()
            for e in edits:
                edited_LTF[e.layer, e.position, e.feature] = e.value
            y_hat, y_edited = clt.decode(codes_LTF, x_LTD)[layer], clt.decode(edited_LTF, x_LTD)[layer]
            return (y_edited + (out_BTD[0] - y_hat)).unsqueeze(0)

        return fn

    with ExitStack() as stack:
        for layer in range(N_LAYERS):
            stack.enter_context(replace_mlp_out(model, layer, splice(layer)))
        return logits64(model, ids)


def strongest(codes_LTF: torch.Tensor, layer: int, position: int) -> tuple[int, float]:
    feature = int(codes_LTF[layer, position].argmax())
    return feature, float(codes_LTF[layer, position, feature])


def test_zeroing_a_clt_feature_equals_the_recomputed_model(model, clt, views):
    codes = codes_by_layer(model, clt, PROMPT)
    feature, act = strongest(codes, 0, 3)
    assert act > 0
    edits = [FeatureEdit(0, 3, feature, 0.0)]
    deltas: dict[int, torch.Tensor] = {}
    with intervene(model, views, edits, lambda layer, d: deltas.__setitem__(layer, d[0])):
        edited = logits64(model, PROMPT)
    expected = oracle_logits(model, clt, PROMPT, edits)
    assert (edited - logits64(model, PROMPT)).abs().max() > 1e-4  # the edit matters
    torch.testing.assert_close(edited, expected, rtol=0, atol=1e-10)
    # it writes into every output layer of its source, -act * W_dec[0][f, o] at that position only
    assert sorted(deltas) == list(range(N_LAYERS))
    for out in range(N_LAYERS):
        want = torch.zeros(len(PROMPT), D, dtype=torch.float64)
        want[3] = -act * clt.decoder(0)[feature, out]
        torch.testing.assert_close(deltas[out], want, rtol=0, atol=1e-12)


def test_clamps_at_two_source_layers_equal_the_recomputed_model(model, clt, views):
    """A layer-2 edit's a_f is read from an input that the layer-1 edit already changed."""
    codes = codes_by_layer(model, clt, PROMPT)
    (f1, a1), (f2, a2) = strongest(codes, 1, 5), strongest(codes, 2, 6)
    edits = [FeatureEdit(1, 5, f1, 3 * a1), FeatureEdit(2, 6, f2, 0.5 * a2 + 1.0), FeatureEdit(1, 6, f1, 0.0)]
    with intervene(model, views, edits):
        edited = logits64(model, PROMPT)
    torch.testing.assert_close(edited, oracle_logits(model, clt, PROMPT, edits), rtol=0, atol=1e-10)


def test_clamping_to_its_own_activation_changes_nothing(model, clt, views):
    codes = codes_by_layer(model, clt, PROMPT)
    feature, act = strongest(codes, 1, 4)
    with intervene(model, views, [FeatureEdit(1, 4, feature, act)]):
        edited = logits64(model, PROMPT)
    torch.testing.assert_close(edited, logits64(model, PROMPT), rtol=0, atol=1e-12)


def test_generation_with_a_clt_and_decode_steps_untouched(model, clt, views):
    codes = codes_by_layer(model, clt, PROMPT)
    feature, act = strongest(codes, 0, len(PROMPT) - 1)
    deltas = []
    with intervene(model, views, [FeatureEdit(0, 2, feature, 0.0)], lambda layer, d: deltas.append((layer, d))):
        sample(model, PROMPT, SamplingConfig(max_new_tokens=3, temperature=0.0), None)
    assert [layer for layer, _ in deltas] == list(range(N_LAYERS)) * 3
    assert all(d.shape[1] == 1 and d.abs().sum() == 0 for _, d in deltas[N_LAYERS:])
    result = run_intervention(model, views, [FeatureEdit(0, len(PROMPT) - 1, feature, 50 * act)], PROMPT, k=5,
                              max_new_tokens=4)  # fmt: skip
    assert len(result.edited_ids) == 4 and result.edited_top != result.original_top
    with pytest.raises(ValueError, match="out of range: layer 3 has 16"):
        run_intervention(model, views, [FeatureEdit(3, 1, F)], PROMPT, max_new_tokens=1)


def test_the_source_layer_s_view_alone_is_enough(model, clt, views):
    """A steering page may hold one layer's view only: its features still write into every later layer."""
    codes = codes_by_layer(model, clt, PROMPT)
    feature, _ = strongest(codes, 1, 2)
    edits = [FeatureEdit(1, None, feature, 2.0)]
    with intervene(model, {1: views[1]}, edits):
        alone = logits64(model, PROMPT)
    with intervene(model, views, edits):
        whole = logits64(model, PROMPT)
    torch.testing.assert_close(alone, whole, rtol=0, atol=0)
    assert (alone - logits64(model, PROMPT)).abs().max() > 1e-4
