"""Tokenize documents and pack them into fixed-length contexts that each start with BOS.

One context of ``ctx_len`` tokens is ``[BOS] + the next ctx_len - 1 tokens`` of
the stream ``doc_1 SEP doc_2 SEP ...`` (SEP is EOS, or BOS when the tokenizer has
no EOS), so documents run across context boundaries and nothing is padded; the
tail that does not fill a context is dropped. The order is fully determined by
the documents, which is what lets a killed cache job resume exactly.

Shape legend: B contexts, T positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import torch


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids that packing inserts, and the ids masked out of training and indexing."""

    bos_id: int
    """Token that starts every context."""
    separator_id: int
    """Token placed between documents."""
    special_ids: tuple[int, ...]
    """All special ids (BOS, EOS, padding, unknown): positions holding them are masked."""

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        if bos is None and eos is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token; cannot mark context starts")
        bos = eos if bos is None else bos
        separator = bos if eos is None else eos
        special = sorted({bos, separator, *getattr(tokenizer, "all_special_ids", [])})
        return cls(bos_id=int(bos), separator_id=int(separator), special_ids=tuple(int(i) for i in special))


def special_mask(tokens_BT: torch.Tensor, special_ids: Iterable[int]) -> torch.Tensor:
    """Boolean [B, T]: True where a position holds a special token."""
    ids = torch.tensor(sorted(special_ids), dtype=tokens_BT.dtype, device=tokens_BT.device)
    return torch.isin(tokens_BT, ids)


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def pack_contexts(
    documents: Iterable[str],
    tokenizer,
    ctx_len: int,
    docs_per_batch: int = 256,
) -> Iterator[list[int]]:
    """Yield contexts of exactly ``ctx_len`` token ids, each starting with BOS."""
    if ctx_len < 2:
        raise ValueError(f"ctx_len must be at least 2 (BOS plus one token), got {ctx_len}")
    special = SpecialTokens.from_tokenizer(tokenizer)
    body = ctx_len - 1
    stream: list[int] = []
    start = 0
    for batch in _batched(documents, docs_per_batch):
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            stream.extend(ids)
            stream.append(special.separator_id)
        while len(stream) - start >= body:
            yield [special.bos_id, *stream[start : start + body]]
            start += body
        del stream[:start]
        start = 0


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt as the model sees it at the start of a context.

    Plain text starts with BOS (EOS when the tokenizer has none), as every cached
    context does. With ``chat`` the text is one user turn wrapped in the tokenizer's
    chat template, with the assistant's turn opened (see ``chat_ids``).
    """
    if chat:
        return chat_ids(tokenizer, [{"role": "user", "content": text}])
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = [] if bos is None else [int(bos)]
    return prefix + [int(t) for t in tokenizer(text, add_special_tokens=False).input_ids]


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a message list in the tokenizer's chat template, with the assistant's turn opened.

    ``apply_chat_template(tokenize=True)`` returns a list (or tensor) of ids in
    transformers 4 and a mapping with ``input_ids`` in transformers 5: both are accepted.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template: use a chat (instruct) model, or leave out --chat")
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return _token_list(encoded)


def _token_list(encoded) -> list[int]:
    """A flat list of ids from what ``apply_chat_template(tokenize=True)`` returned (list, tensor or mapping)."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        if len(encoded) != 1:
            raise ValueError(f"expected one chat prompt, got a batch of {len(encoded)}")
        encoded = encoded[0]
    return [int(t) for t in encoded]
