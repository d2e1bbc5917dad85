"""Checksums of a store's parts: of each session's block of vectors, and of each sealed unit of
its database (a row; for ``examples``, a session's rows; the schema). The store writes them in
the transaction of what they cover; ``verify`` checks them all, and the store's reads check what
they return before it is used (:func:`read_sealed`, :func:`check_blocks`).

A block of vectors checked once is not hashed again in this process while its file stays cached
(see :func:`check_blocks`); sealed rows are checked on every read, since rows can be rewritten.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icl_cl.errors import StoreCorruptError

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
    "edits": "session",
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
    return _digests(names, names.index(column), cursor)


def _digests(names: Sequence[str], at: int, rows: Any) -> dict[str, str]:
    """SHA-256 of each unit of ``rows`` (in unit order; ``at``: the unit's column)."""
    digests: dict[str, Any] = {}
    for row in rows:
        unit = str(row[at])
        if unit not in digests:
            digests[unit] = hashlib.sha256()
        digests[unit].update(_encode_row(names, row))
    return {unit: h.hexdigest() for unit, h in digests.items()}


def unit_problem(table: str, unit: str, actual: str | None, sealed: str | None) -> str | None:
    """What is wrong with one unit of ``table`` given its digest and its seal (``None``: either
    absent); ``None`` when nothing is. The wording ``verify`` and the checked reads share."""
    name = f"{table} {SEALED[table]} {unit}"
    if sealed is None:
        return None if actual is None else f"{name} has no checksum"
    if actual is None:
        return f"{name} is missing"
    return None if actual == sealed else f"{name} does not match its checksum"


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


def block_digest(data: bytes | memoryview) -> str:
    """SHA-256 of one session's block of the vector file."""
    return hashlib.sha256(data).hexdigest()


def check_block(
    file: Path,
    dim: int,
    session: int,
    first_row: int,
    n_rows: int,
    sha256: str,
    data: bytes | memoryview | None = None,
) -> str | None:
    """What is wrong with one session's block of vectors in ``file`` (``None``: nothing);
    ``data``: the block's bytes as already read (else they are read from ``file``)."""
    width = 4 * dim
    if data is None:
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


# ---- checked reads ------------------------------------------------------------------------------


@dataclass
class ReadChecks:
    """What this process's checked reads did, for benchmarks: seconds spent checking, vector
    blocks hashed (and their bytes), blocks found already checked, sealed units checked."""

    seconds: float = 0.0
    blocks_hashed: int = 0
    bytes_hashed: int = 0
    blocks_cached: int = 0
    units: int = 0


READ_CHECKS = ReadChecks()


def read_sealed(
    conn: sqlite3.Connection,
    table: str,
    units: Sequence[Any] | None = None,
    *,
    source: Path,
    check: bool = True,
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The rows of ``table`` (all, or those of ``units``) and their column names, each unit
    checked against its seal as ``verify`` checks it. Rows and seals come from one statement,
    so a commit by another connection is seen entirely or not at all.

    Args:
        source: The database file, named in the error.
        check: Check the seals (``False``: only read, for ``verify``, which checks them itself).

    Raises:
        StoreCorruptError: A unit read does not match its seal or has none; with all units, a
            sealed unit is missing.
    """
    column = SEALED[table]
    where, params = "", list(units or [])
    if units is not None:
        if not params:
            return [], []
        where = f" WHERE t.{column} IN ({','.join('?' * len(params))})"
    cursor = conn.execute(
        f"SELECT t.*, s.sha256, (SELECT COUNT(*) FROM seals WHERE tbl = ?) FROM {table} AS t "
        f"LEFT JOIN seals AS s ON s.tbl = ? AND s.unit = CAST(t.{column} AS TEXT){where} "
        f"ORDER BY t.{column}, t.rowid",
        [table, table, *params],
    )
    names = [d[0] for d in cursor.description][:-2]
    found = cursor.fetchall()
    start = time.perf_counter()  # the rows are read in any case: the check is what follows
    rows = [row[:-2] for row in found]
    if check:
        at = names.index(column)
        sealed = {str(row[at]): row[-2] for row in found}
        problems = [
            unit_problem(table, unit, digest, sealed[unit])
            for unit, digest in _digests(names, at, rows).items()
        ]
        if units is None and found and found[0][-1] > len(sealed):
            problems.append(f"{table}: {found[0][-1] - len(sealed)} sealed units are missing")
        READ_CHECKS.units += len(sealed)
        READ_CHECKS.seconds += time.perf_counter() - start
        damaged = [p for p in problems if p]
        if damaged:
            raise StoreCorruptError(f"{source}: {damaged[0]} (store damaged){_verify_hint(source)}")
    return names, rows


def _verify_hint(file: Path) -> str:
    return f"; icl-cl verify --store {file.parent} checks all"


def _state(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_size, stat.st_mtime_ns


class _VerifiedBlocks:
    """Blocks of vector files whose checksum this process has checked, by file (its inode).

    A file's checked blocks are trusted while the file keeps the size and modification time it
    had when they were checked, or that an append by this process gave it (:meth:`appended`);
    any other change (a write elsewhere in it, another process's learn) has them checked again.
    Each cached file is held open, so that its inode number cannot be reused by another file
    while its blocks are trusted; the least recently used file is dropped beyond ``max_files``.
    """

    def __init__(self, max_files: int = 32) -> None:
        self.max_files = max_files
        # (device, inode) -> [the open file, its state when checked, the blocks checked]
        self._files: OrderedDict[tuple[int, int], list[Any]] = OrderedDict()
        self._lock = threading.Lock()

    def checked(self, file: Path, stat: os.stat_result) -> set[tuple[Any, ...]]:
        """The blocks of ``file`` checked as it was when ``stat`` was taken (before its bytes
        were read); the caller adds those it checks."""
        key = (stat.st_dev, stat.st_ino)
        with self._lock:
            entry = self._files.get(key)
            if entry is None:
                handle = open(file, "rb")  # kept open while cached
                now = os.fstat(handle.fileno())
                if (now.st_dev, now.st_ino) != key:  # replaced meanwhile: check, do not keep
                    handle.close()
                    return set()
                entry = self._files[key] = [handle, _state(stat), set()]
                while len(self._files) > self.max_files:
                    self._files.popitem(last=False)[1][0].close()
            elif entry[1] != _state(stat):
                entry[1:] = [_state(stat), set()]
            self._files.move_to_end(key)
            return entry[2]

    def appended(self, before: os.stat_result, after: os.stat_result) -> None:
        """This process appended to a vector file (``before`` and ``after`` its write): the
        blocks checked before stay trusted, if nothing else changed the file since."""
        with self._lock:
            entry = self._files.get((before.st_dev, before.st_ino))
            if entry is not None and entry[1] == _state(before):
                entry[1] = _state(after)

    def clear(self) -> None:
        with self._lock:
            for handle, _, _ in self._files.values():
                handle.close()
            self._files.clear()


VERIFIED_BLOCKS = _VerifiedBlocks()


def check_blocks(
    file: Path,
    dim: int,
    blocks: Sequence[tuple[int, int, int, str]],
    data: tuple[os.stat_result, Any] | None = None,
) -> None:
    """Check the blocks ``(session, first_row, n_rows, sha256)`` of the vector file: those not
    checked before in this process (see :class:`_VerifiedBlocks`) are hashed, from ``data``
    (the file's status and then its bytes from row 0, as just read) or else from the file.

    Raises:
        StoreCorruptError: A block does not match its checksum or is cut short; names it.
    """
    start = time.perf_counter()
    try:
        with open(file, "rb") as f:
            stat, content = data if data is not None else (os.fstat(f.fileno()), None)
            checked = VERIFIED_BLOCKS.checked(file, stat)
            width = 4 * dim
            for block in blocks:
                if block in checked:
                    READ_CHECKS.blocks_cached += 1
                    continue
                session, first_row, n_rows, sha256 = block
                if content is not None:
                    part = content[first_row * width : (first_row + n_rows) * width]
                else:
                    f.seek(first_row * width)
                    part = f.read(n_rows * width)
                problem = check_block(file, dim, session, first_row, n_rows, sha256, part)
                if problem:
                    raise StoreCorruptError(problem + _verify_hint(file))
                checked.add(block)
                READ_CHECKS.blocks_hashed += 1
                READ_CHECKS.bytes_hashed += n_rows * width
    finally:
        READ_CHECKS.seconds += time.perf_counter() - start
