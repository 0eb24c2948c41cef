"""Advisory locks that keep two jobs from writing the same part of a run at once.

``exclusive(path, what)`` takes a non-blocking ``flock`` on a small lock file
holding the owner's pid. The kernel drops the lock when the process dies, so a
killed job never leaves a run locked; a second writer is refused at once with
the owner's pid. Readers take no lock and are never blocked.

On release the holder deletes the lock file (still holding it) and then every
folder it created for the lock that is left empty, so a refused or failed job
leaves no new folder or lock file behind. A process that locked a file another
holder has just deleted sees that the path no longer names its file and tries again.
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


def _missing_parents(folder: Path) -> list[Path]:
    """The folders ``mkdir(parents=True)`` would create for ``folder``, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _still_named(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a releasing holder may have just deleted it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _lock(path: Path, what: str) -> int:
    """An open descriptor of ``path`` holding its exclusive lock, or LockedError."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            owner = _owner(fd)
            os.close(fd)
            raise LockedError(
                f"{what} is in use by process {owner}: wait for that job to finish or stop it, then re-run"
            ) from error
        if _still_named(fd, path):
            return fd
        os.close(fd)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (the job wrote something there) or already gone
            return


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the block, or raise LockedError."""
    path = Path(path)
    created = _missing_parents(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _lock(path, what)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield
    finally:
        path.unlink(missing_ok=True)  # deleted while still held: no other process holds this file
        os.close(fd)  # closing the descriptor releases the lock
        _remove_empty(created)
