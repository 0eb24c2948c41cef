"""Packing: fixed length, BOS first, documents separated by EOS, special positions marked."""

import pytest
import torch

from pipeline.lm.packing import SpecialTokens, chat_ids, encode_prompt, pack_contexts, special_mask


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


CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant: {% endif %}"
)


def chat_tokenizer():
    """A private tiny tokenizer (the session one is shared) carrying a small chat template."""
    from conftest import make_tokenizer

    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def rendered_ids(tokenizer, text: str) -> list[int]:
    """The oracle: the template rendered by hand, then tokenized as plain text."""
    return tokenizer(f"<bos>user: {text}\n<bos>assistant: ", add_special_tokens=False).input_ids


def test_chat_prompt_is_the_rendered_template_on_the_installed_transformers():
    tokenizer = chat_tokenizer()
    expected = rendered_ids(tokenizer, "hi there")
    assert encode_prompt(tokenizer, "hi there", chat=True) == expected
    assert chat_ids(tokenizer, [{"role": "user", "content": "hi there"}]) == expected
    assert expected != encode_prompt(tokenizer, "hi there")  # the plain prompt is only BOS + text


@pytest.mark.parametrize("style", ["mapping", "list", "batched list", "tensor", "mapping of tensors"])
def test_every_apply_chat_template_return_type_gives_the_same_ids(monkeypatch, style):
    """transformers 5 returns a BatchEncoding; transformers 4 a list of ids (or a [1, T] tensor)."""
    tokenizer = chat_tokenizer()
    expected = rendered_ids(tokenizer, "hi")
    real = tokenizer.apply_chat_template

    def older(messages, **kwargs):
        ids = list(real(messages, **kwargs)["input_ids"])
        return {
            "mapping": {"input_ids": ids, "attention_mask": [1] * len(ids)},
            "list": ids,
            "batched list": [ids],
            "tensor": torch.tensor([ids]),
            "mapping of tensors": {"input_ids": torch.tensor([ids])},
        }[style]

    monkeypatch.setattr(tokenizer, "apply_chat_template", older)
    assert encode_prompt(tokenizer, "hi", chat=True) == expected


def test_a_batch_of_chat_prompts_is_refused(monkeypatch):
    tokenizer = chat_tokenizer()
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *a, **k: [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="one chat prompt, got a batch of 2"):
        encode_prompt(tokenizer, "hi", chat=True)


def test_a_tokenizer_without_chat_template_is_a_clear_error(tokenizer):
    assert not tokenizer.chat_template
    with pytest.raises(ValueError, match="this tokenizer has no chat template: .* leave out --chat"):
        encode_prompt(tokenizer, "hi", chat=True)
    with pytest.raises(ValueError, match="no chat template"):
        chat_ids(tokenizer, [{"role": "user", "content": "hi"}])
