"""Checksums of a store's parts: of each session's block of vectors, and of each sealed unit of
its database (a row; for ``examples``, a session's rows; the schema). The store writes them in
the transaction of what they cover; opening and ``verify`` check them."""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The column that names a sealed unit of each table: one row, or for examples a session's rows.
SEALED = {
    "meta": "key",
    "labels": "col",
    "examples": "session",
    "sessions": "session",
    "statistics": "key",
    "fitted": "key",
    "summaries": "label",
    "images": "key",
    "blocks": "session",
    "idempotency": "key",
}
SCHEMA_SEAL = ("sqlite_schema", "")


def _encode_row(names: Sequence[str], row: Sequence[Any]) -> bytes:
    """A row's content as bytes for a digest: each non-NULL column as name, type and value
    (length-prefixed), so a column added later as NULL leaves older digests as they were."""
    parts = []
    for name, value in zip(names, row, strict=True):
        if value is None:
            continue
        if isinstance(value, bytes):
            tag, data = b"b", value
        elif isinstance(value, str):
            tag, data = b"s", value.encode("utf-8")
        elif isinstance(value, int):
            tag, data = b"i", str(value).encode()
        else:
            tag, data = b"f", struct.pack("<d", value)
        key = name.encode()
        parts.append(struct.pack("<I", len(key)) + key + tag + struct.pack("<Q", len(data)) + data)
    return b"".join(parts)


def unit_digests(
    conn: sqlite3.Connection, table: str, units: Sequence[Any] | None = None
) -> dict[str, str]:
    """SHA-256 of each sealed unit of ``table`` (all of them, or those named by ``units``)."""
    column = SEALED[table]
    where, params = "", list(units or [])
    if units is not None:
        if not params:
            return {}
        where = f" WHERE {column} IN ({','.join('?' * len(params))})"
    cursor = conn.execute(f"SELECT * FROM {table}{where} ORDER BY {column}, rowid", params)
    names = [d[0] for d in cursor.description]
    at = names.index(column)
    digests: dict[str, Any] = {}
    for row in cursor:
        unit = str(row[at])
        if unit not in digests:
            digests[unit] = hashlib.sha256()
        digests[unit].update(_encode_row(names, row))
    return {unit: h.hexdigest() for unit, h in digests.items()}


def schema_digest(conn: sqlite3.Connection) -> str:
    """SHA-256 of the database schema (every table and index definition)."""
    rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY name")
    digest = hashlib.sha256()
    for row in rows:
        digest.update(_encode_row(("type", "name", "tbl_name", "sql"), row))
    return digest.hexdigest()


def seal(conn: sqlite3.Connection, table: str, units: Sequence[Any]) -> None:
    """Write the digests of ``units`` of ``table`` (inside the caller's transaction)."""
    conn.executemany(
        "INSERT OR REPLACE INTO seals(tbl, unit, sha256) VALUES (?, ?, ?)",
        [(table, unit, digest) for unit, digest in unit_digests(conn, table, units).items()],
    )


def seal_schema(conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO seals(tbl, unit, sha256) VALUES (?, ?, ?)",
        (*SCHEMA_SEAL, schema_digest(conn)),
    )


def block_digest(data: bytes) -> str:
    """SHA-256 of one session's block of the vector file."""
    return hashlib.sha256(data).hexdigest()


def check_block(
    file: Path, dim: int, session: int, first_row: int, n_rows: int, sha256: str
) -> str | None:
    """What is wrong with one session's block of vectors in ``file`` (``None``: nothing)."""
    width = 4 * dim
    with open(file, "rb") as f:
        f.seek(first_row * width)
        data = f.read(n_rows * width)
    if len(data) < n_rows * width:
        return f"{file}: session {session}'s vectors are cut short (file damaged)"
    if block_digest(data) != sha256:
        return (
            f"{file}: session {session}'s vectors (rows {first_row}-"
            f"{first_row + n_rows - 1}) do not match their checksum (file damaged)"
        )
    return None
