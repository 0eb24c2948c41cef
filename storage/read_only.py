"""Read-only DuckDB connections that follow a file replaced by an atomic rename, and never disturb each other."""

from __future__ import annotations

from pathlib import Path

import duckdb


def open_read_only(path: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection of its own to ``path``, in a private DuckDB instance.

    ``duckdb.connect(path)`` shares one instance per path within a process, so a connection made
    after the file was replaced would read the old file while any old connection stays open;
    attaching into a private in-memory instance reads the file that is at ``path`` now, and an
    older connection keeps answering from the file it opened.
    """
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"ATTACH '{_sql_string(path)}' AS db (READ_ONLY)")
        con.execute("USE db")
    except duckdb.Error:
        con.close()
        raise
    return con


def _sql_string(path: Path) -> str:
    return str(path).replace("'", "''")
