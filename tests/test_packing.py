"""Packing: fixed length, BOS first, documents separated by EOS, special positions marked."""

import torch

from pipeline.lm.packing import SpecialTokens, pack_contexts, special_mask


def test_contexts_start_with_bos_and_have_fixed_length(tokenizer):
    docs = ["abc def", "ghij", "klmnopq rs", "tuv"]
    contexts = list(pack_contexts(docs, tokenizer, ctx_len=6))
    bos = tokenizer.bos_token_id
    assert contexts and all(len(c) == 6 and c[0] == bos for c in contexts)


def test_stream_is_documents_joined_by_eos(tokenizer):
    docs = ["abc def", "ghij", "klmnopq rs", "tuv"]
    contexts = list(pack_contexts(docs, tokenizer, ctx_len=6, docs_per_batch=2))
    eos = tokenizer.eos_token_id
    body = [t for c in contexts for t in c[1:]]
    expected = []
    for doc in docs:
        expected += tokenizer(doc, add_special_tokens=False).input_ids + [eos]
    assert body == expected[: len(body)]
    assert len(expected) - len(body) < 5  # only the tail that cannot fill a context is dropped


def test_special_mask_marks_bos_and_separators(tokenizer):
    special = SpecialTokens.from_tokenizer(tokenizer)
    contexts = torch.tensor(list(pack_contexts(["ab", "cd", "ef"], tokenizer, ctx_len=4)))
    mask = special_mask(contexts, special.special_ids)
    assert mask[:, 0].all()
    expected = (contexts == tokenizer.bos_token_id) | (contexts == tokenizer.eos_token_id)
    assert torch.equal(mask, expected)
    assert mask.sum() < mask.numel()


def test_packing_is_deterministic(tokenizer):
    docs = [f"document number {i} with some words" for i in range(50)]
    assert list(pack_contexts(docs, tokenizer, 16, docs_per_batch=7)) == list(
        pack_contexts(docs, tokenizer, 16, docs_per_batch=50)
    )


def test_gpt2_style_tokenizer_without_bos_uses_eos(tokenizer):
    class NoBos:
        bos_token_id = None
        eos_token_id = 2
        all_special_ids = [2]

    special = SpecialTokens.from_tokenizer(NoBos())
    assert special.bos_id == 2 and special.separator_id == 2
