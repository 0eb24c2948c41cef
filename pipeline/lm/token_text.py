"""How a token reads on screen: its bytes for byte-level BPE tokens that are not whole UTF-8 alone.

A byte-level BPE tokenizer (GPT-2, Llama 3, SmolLM2) spells every byte as one
printable character (GPT-2's byte-to-unicode table); a token holding part of a
multi-byte character decodes alone to U+FFFD, so distinct tokens look alike.
``token_bytes`` maps a token's spelling back to its bytes so it can be shown as
``\\xe2\\x80``; ``display_text`` turns a decoded token into what a page shows.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pipeline.lm.models import ModelLoadError, file_sha256, resolve_spec

REPLACEMENT = "\ufffd"
VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}
SPACE = "·"


@lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table: printable bytes stand for themselves, the rest shift to 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def token_bytes(spelling: str | None) -> bytes | None:
    """The bytes a byte-level BPE token spells, or None when ``spelling`` is not a byte-level spelling."""
    if not spelling:
        return None
    table = _byte_of_char()
    if any(char not in table for char in spelling):
        return None
    return bytes(table[char] for char in spelling)


def vocab_bytes(tokenizer, ids: list[int]) -> list[bytes | None]:
    """Per id, its bytes when the tokenizer is byte-level BPE (None for other tokenizers and special tokens)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    spellings = tokenizer.convert_ids_to_tokens(list(ids))
    return [None if i in special else token_bytes(s) for i, s in zip(ids, spellings, strict=True)]


def escaped_bytes(raw: bytes) -> str:
    r"""Bytes as ``\xe2\x80``, keeping printable ASCII as it is."""
    return "".join(chr(b) if 0x21 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw)


def display_text(text: str, raw: bytes | None = None) -> str:
    """What a page shows for a decoded token: bytes when it is not whole text alone, visible whitespace.

    A token of only spaces shows each as ``·``; newlines and tabs show as ``↵`` and ``⇥`` anywhere.
    """
    if REPLACEMENT in text and raw is not None:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return escaped_bytes(raw)
    if text and not text.strip(" "):
        return SPACE * len(text)
    for char, symbol in VISIBLE.items():
        text = text.replace(char, symbol)
    return text


def token_text(tokenizer, token_id: int) -> str:
    r"""One token decoded alone, or its bytes (``\xe2\x80``) when it holds only part of a character."""
    text = tokenizer.decode([token_id])
    if REPLACEMENT not in text:
        return text
    raw = vocab_bytes(tokenizer, [token_id])[0]
    return display_text(text, raw) if raw is not None else text


def merged_texts(texts: list[str], raw: list[bytes | None] | None) -> list[str]:
    """Per token, the text it completes: a run of byte tokens puts its merged character on its last token.

    ``texts`` are single-token decodes; where ``raw`` gives a token's bytes, bytes that do not end a
    UTF-8 character wait for the next tokens, so the concatenation equals the decode of the whole run.
    """
    if raw is None:
        return list(texts)
    out, pending = [], b""
    for text, token_raw in zip(texts, raw, strict=True):
        if token_raw is None or (not pending and REPLACEMENT not in text):
            out.append(pending.decode("utf-8", "replace") + text if pending else text)
            pending = b""
            continue
        pending += token_raw
        try:
            out.append(pending.decode("utf-8"))
            pending = b""
        except UnicodeDecodeError:
            out.append("")
    if pending:
        out[-1] += pending.decode("utf-8", "replace")
    return out


def load_tokenizer(spec: str, convert_dir: Path | None = None):
    """The tokenizer of a model spec alone (no weights): from the converted copy of a GGUF file when one exists.

    The converted copy is the folder ``load_model`` publishes (``<stem>-<sha256[:16]>`` in ``convert_dir``).
    """
    from transformers import AutoTokenizer

    source, location = resolve_spec(spec, convert_dir)
    try:
        if source != "gguf":
            return AutoTokenizer.from_pretrained(location)
        path = Path(location)
        converted = Path(convert_dir) / f"{path.stem}-{file_sha256(path)[:16]}" if convert_dir else None
        if converted is not None and converted.is_dir():
            return AutoTokenizer.from_pretrained(converted)
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise ModelLoadError(f"could not load the tokenizer of {spec!r}: {error}") from error
