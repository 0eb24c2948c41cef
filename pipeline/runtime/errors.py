"""Turning third-party exceptions into one readable line."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
