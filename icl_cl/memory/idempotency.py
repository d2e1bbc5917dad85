"""Idempotency keys of the sessions learned through the service: a key, a digest of its request
and the session it made. A key is written and sealed in its session's transaction, so it is
stored if and only if its session is, across a crash and a restart."""

from __future__ import annotations

import sqlite3

from icl_cl.memory.checksums import seal, seal_schema

# Added (in the session's transaction) by the first session that has a key.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, digest TEXT NOT NULL,
    session INTEGER NOT NULL);
"""


def write_idempotency(conn: sqlite3.Connection, key: str, digest: str, session: int) -> None:
    """Store an idempotency key with its session (inside the session's transaction)."""
    if not _has_table(conn):
        conn.execute(_SCHEMA)  # transactional DDL: rolled back with the session
        seal_schema(conn)
    conn.execute(
        "INSERT INTO idempotency(key, digest, session) VALUES (?, ?, ?)", (key, digest, session)
    )
    seal(conn, "idempotency", [key])


def stored_session(conn: sqlite3.Connection, key: str) -> tuple[str, int] | None:
    """The digest of the request stored under ``key`` and the session it made, if any."""
    if not _has_table(conn):
        return None
    row = conn.execute("SELECT digest, session FROM idempotency WHERE key = ?", (key,)).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def _has_table(conn: sqlite3.Connection) -> bool:
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'idempotency'"
    ).fetchone()
    return found is not None
