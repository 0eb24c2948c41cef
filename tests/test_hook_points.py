"""Hook points inside blocks: names round trip, captures equal a hand-run block, one forward stops early."""

import pytest
import torch

from pipeline.lm.hook_points import KINDS, HookPoint, capture, mlp_module, parse_layers
from pipeline.lm.hooks import decoder_blocks, residual_after_block


@pytest.fixture
def ids(tokenizer):
    return tokenizer(["The cat sat on the mat.", "Sparse features"], padding=True, return_tensors="pt").input_ids


@pytest.mark.parametrize("kind", KINDS)
def test_names_round_trip(kind):
    point = HookPoint(7, kind)
    assert HookPoint.from_name(point.name) == point


def test_bad_names_and_layers_say_what_is_valid():
    with pytest.raises(ValueError, match="unknown hook point"):
        HookPoint(0, "mlp-mid")
    with pytest.raises(ValueError, match="unknown hook name"):
        HookPoint.from_name("blocks.x.hook_mlp_out")
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("0-30", 30)
    with pytest.raises(ValueError, match="cannot read layers"):
        parse_layers("first", 30)
    assert parse_layers("all", 3) == (0, 1, 2)
    assert parse_layers("1,3-4", 6) == (1, 3, 4)


def test_captures_add_up_to_the_residual_stream(tiny_model, ids):
    """resid_post(L) = resid_post(L-1) + attn_out(L) + mlp_out(L), and mlp_in is the normed mid-residual."""
    points = [HookPoint(layer, kind) for layer in (1, 2) for kind in KINDS]
    acts = capture(tiny_model, ids, points)
    resid_1 = residual_after_block(tiny_model, ids, 1)
    torch.testing.assert_close(acts[HookPoint(1, "resid-post")], resid_1, rtol=0, atol=0)
    mid = resid_1 + acts[HookPoint(2, "attn-out")]
    torch.testing.assert_close(mid + acts[HookPoint(2, "mlp-out")], acts[HookPoint(2, "resid-post")])
    block = decoder_blocks(tiny_model)[2]
    with torch.no_grad():
        torch.testing.assert_close(block.post_attention_layernorm(mid), acts[HookPoint(2, "mlp-in")])
        torch.testing.assert_close(mlp_module(block)(acts[HookPoint(2, "mlp-in")]), acts[HookPoint(2, "mlp-out")])


def test_one_forward_stops_after_the_deepest_point(tiny_model, ids):
    calls = []
    blocks = decoder_blocks(tiny_model)
    hooks = lambda: [(dict(b._forward_hooks), dict(mlp_module(b)._forward_pre_hooks)) for b in blocks]  # noqa: E731
    before = hooks()  # transformers may keep hooks of its own here (output_hidden_states installs them)
    handles = [b.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    try:
        capture(tiny_model, ids, [HookPoint(0, "mlp-in"), HookPoint(1, "mlp-out")])
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0, 1]
    assert hooks() == before
