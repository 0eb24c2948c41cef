"""Advisory locks that keep two jobs from writing the same part of a run at once.

``exclusive(path, what)`` takes a non-blocking ``flock`` on a small lock file
holding the owner's pid. The kernel drops the lock when the process dies, so a
killed job never leaves a run locked; a second writer is refused at once with
the owner's pid. Readers take no lock and are never blocked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, jobs run unguarded
    fcntl = None


class LockedError(ValueError):
    """Another live process holds the lock."""


def _owner(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 32).decode("ascii", "replace").strip()
    return text or "unknown"


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the block, or raise LockedError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                raise LockedError(
                    f"{what} is in use by process {_owner(fd)}: wait for that job to finish or stop it, then re-run"
                ) from error
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
