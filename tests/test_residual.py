"""Hook capture equals output_hidden_states, and the truncated forward runs nothing after the block."""

import pytest
import torch

from pipeline.lm.hooks import check_layer, decoder_blocks, residual_after_block


@pytest.fixture
def ids(tokenizer):
    return tokenizer(
        ["The cat sat on the mat.", "Sparse features, dense model"], padding=True, return_tensors="pt"
    ).input_ids


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_capture_equals_hidden_states(tiny_model, ids, layer):
    with torch.no_grad():
        hidden = tiny_model(ids, output_hidden_states=True).hidden_states
    captured = residual_after_block(tiny_model, ids, layer)
    assert captured.shape == (ids.shape[0], ids.shape[1], tiny_model.config.hidden_size)
    torch.testing.assert_close(captured, hidden[layer + 1], rtol=0, atol=1e-6)


def test_truncated_forward_skips_later_blocks_and_head(tiny_model, ids):
    calls = []
    blocks = decoder_blocks(tiny_model)
    handles = [blk.register_forward_hook(lambda *_, i=i: calls.append(i)) for i, blk in enumerate(blocks)]
    handles.append(tiny_model.lm_head.register_forward_hook(lambda *_: calls.append("head")))
    handles.append(tiny_model.model.norm.register_forward_hook(lambda *_: calls.append("norm")))
    try:
        residual_after_block(tiny_model, ids, 1)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0, 1]


def test_hooks_removed_after_capture(tiny_model, ids):
    before = [len(blk._forward_hooks) for blk in decoder_blocks(tiny_model)]
    residual_after_block(tiny_model, ids, 2)
    assert [len(blk._forward_hooks) for blk in decoder_blocks(tiny_model)] == before


def test_finds_blocks_of_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(residual_after_block(model, ids, 1), hidden[2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("layer", [-1, 4, 40])
def test_bad_layer_names_valid_range(layer):
    with pytest.raises(ValueError, match=r"layer -?\d+ out of range: model has 4 layers \(0-3\)"):
        check_layer(layer, 4)
