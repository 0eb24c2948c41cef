"""Value types of `saescope train`'s options: one value, a comma list (a grid), an architecture name.

``listed`` parses the options that take comma lists (a tuple of values makes a grid),
``one_value`` refuses a list for the options every member of a grid shares, and
``architecture`` accepts saescope's and SAELens' architecture names. The bottom of
jobs.training: it imports nothing from the package.
"""

from __future__ import annotations

import argparse

from pipeline.sae.model import ARCHITECTURES

GRID_FLAGS = "--arch, --k, --d-sae, --expansion and --lr"
"""The options that take comma lists; every other option is shared by all members."""


def as_tuple(value) -> tuple:
    """A grid option's values: a tuple stays, a single value becomes a 1-tuple."""
    return value if isinstance(value, tuple) else (value,)


def listed(kind):
    """An argparse type: one value of ``kind``, or a comma list of them (a tuple: a grid)."""

    def parse(text: str):
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected a value or a comma list without blanks, got {text!r}")
        values = tuple(kind(part) for part in parts)
        return values[0] if len(values) == 1 else values

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def one_value(kind):
    """An argparse type for an option all grid members share: a comma list is refused in one line."""

    def parse(text: str):
        if "," in text:
            raise argparse.ArgumentTypeError(
                f"takes one value, got {text!r}: every SAE of a grid reads the same batches "
                f"(comma lists are for {GRID_FLAGS})"
            )
        return kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


ARCHITECTURE_ALIASES = {"matryoshka_batchtopk": "matryoshka"}
"""SAELens' names accepted by --arch for the saescope architecture that trains them."""


def architecture(text: str) -> str:
    text = ARCHITECTURE_ALIASES.get(text, text)
    if text not in ARCHITECTURES:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(ARCHITECTURES)})")
    return text
