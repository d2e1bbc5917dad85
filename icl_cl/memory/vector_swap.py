"""Replacing a store's whole vector file atomically with its database (a forget or a relabel).

A learn only appends to ``examples.f32``; a forget rewrites it without the forgotten rows. The new
file is written beside it (:data:`STAGED`) and fsynced first; the database transaction that
describes the new rows (their blocks and checksums) also records, in ``meta``, that the staged
file replaces the old one; then the staged file is renamed into place and the record removed.
The database commit decides:

- a crash before it leaves the old database and the old file (the staged file is deleted by
  the next writable open);
- a crash after it leaves the new database; the next writable open finishes the rename.

So a store is always the old one or the new one, never a mix.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from icl_cl.errors import StoreError

STAGED = ".examples.f32.next"
# Meta key of a committed replacement whose rename may not have happened yet.
PENDING = "vectors_replaced"


def stage(path: Path, data: bytes) -> Path:
    """Write the replacement vector file beside the store's and fsync it."""
    staged = path / STAGED
    with open(staged, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return staged


def finish(path: Path, conn: sqlite3.Connection, vectors: str, *, read_only: bool) -> None:
    """Complete or undo a replacement interrupted by a crash (see the module); a store opened
    read-only with a committed replacement still to rename is refused."""
    staged = path / STAGED
    pending = conn.execute("SELECT 1 FROM meta WHERE key = ?", (PENDING,)).fetchone() is not None
    if not pending and not staged.exists():
        return
    if read_only:
        if pending and staged.exists():
            raise StoreError(
                f"{path}: a forget was interrupted after its commit; open the store once where "
                "it can be written to finish it"
            )
        return
    if pending:
        if staged.exists():
            os.replace(staged, path / vectors)
            fsync_dir(path)
        clear(conn)
    else:  # staged by an edit that never committed
        staged.unlink()


def clear(conn: sqlite3.Connection) -> None:
    """Remove the record of a replacement once its file is in place."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM meta WHERE key = ?", (PENDING,))
        conn.execute("DELETE FROM seals WHERE tbl = 'meta' AND unit = ?", (PENDING,))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a file created or renamed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
