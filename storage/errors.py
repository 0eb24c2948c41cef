"""The one-line form of an error, for messages that quote a library's failure (storage may not import pipeline)."""


def first_line(error: BaseException) -> str:
    """The first line of the error's message, or its type's name when it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
