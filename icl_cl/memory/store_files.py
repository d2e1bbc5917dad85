"""The files of a store directory and how they are opened, created and locked.

It holds the layout's names, the format (manifest, SQLite schema, application id), the
connections (read-write, or read-only on storage that cannot be written), the creation of a new
store, opening one (an interrupted forget finished or undone, then a quick check), the writer
lock, and the two write primitives every writer uses: an atomic file replacement and an
immediate transaction. :class:`~icl_cl.memory.store.Store`
composes them; the layout and the crash story are described in :mod:`icl_cl.memory.store`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sqlite3
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from icl_cl.errors import StoreBusyError, StoreCorruptError, StoreError
from icl_cl.memory.checksums import check_blocks, seal, seal_schema
from icl_cl.memory.vector_swap import finish as finish_vector_swap
from icl_cl.memory.vector_swap import fsync_dir

FORMAT = "icl_cl-store"
FORMAT_VERSION = 2
# SQLite's application id ("ICLC"): names the file format in the database header.
APPLICATION_ID = 0x49434C43
MANIFEST = "manifest.json"
DATABASE = "store.sqlite"
VECTORS = "examples.f32"
LOCK = "writer.lock"
# Meta key of a store whose multi-label statistics count each item once (copies of an input
# learned in several sessions add only their new labels; see memory.item_groups). Stores written
# before it counted every row: their multi-label statistics are recomputed on open and rewritten
# by the next session (ExternalContinualLearner), and ``verify`` checks them as rows.
ITEM_STATISTICS = "item_statistics"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE labels (
    col INTEGER PRIMARY KEY, label TEXT UNIQUE NOT NULL, name TEXT NOT NULL,
    description TEXT NOT NULL, grp TEXT NOT NULL, session INTEGER NOT NULL,
    count INTEGER NOT NULL, total BLOB NOT NULL, vector BLOB NOT NULL);
CREATE TABLE examples (
    row INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, text TEXT NOT NULL,
    labels TEXT NOT NULL, session INTEGER NOT NULL);
CREATE TABLE sessions (
    session INTEGER PRIMARY KEY, created_at TEXT NOT NULL, n_examples INTEGER NOT NULL,
    new_labels TEXT NOT NULL, seconds REAL NOT NULL);
CREATE TABLE statistics (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE fitted (key TEXT PRIMARY KEY, value TEXT NOT NULL, n_examples INTEGER NOT NULL);
CREATE TABLE summaries (label TEXT PRIMARY KEY, summary TEXT NOT NULL, model TEXT NOT NULL,
    created_at TEXT NOT NULL);
CREATE TABLE blocks (session INTEGER PRIMARY KEY, first_row INTEGER NOT NULL,
    n_rows INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE seals (tbl TEXT NOT NULL, unit TEXT NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (tbl, unit));
"""

# Image examples: the encoded bytes live in the store (demonstrations show them to the LLM, and a
# store must not depend on files elsewhere); an example row names its image by key. Added to a
# store, in the session's transaction, the first time it learns an image.
IMAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (key TEXT PRIMARY KEY, data BLOB NOT NULL, source TEXT NOT NULL);
"""


def has_images(conn: sqlite3.Connection) -> bool:
    """Whether the store has learned an image (its ``examples`` have an ``image`` column)."""
    return any(c[1] == "image" for c in conn.execute("PRAGMA table_info(examples)").fetchall())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """An immediate (write-locked) transaction: committed whole, or rolled back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _uri(path: Path, **params: str) -> str:
    query = "&".join(f"{key}={value}" for key, value in params.items())
    return f"file:{urllib.parse.quote(str(path.resolve()))}?{query}"


def connect(path: Path, mode: str = "rw") -> sqlite3.Connection:
    """A writing connection; ``mode=rw`` never creates the file (``rwc`` does, for a new store)."""
    conn = sqlite3.connect(
        _uri(path, mode=mode), uri=True, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when it returns, so an acknowledged session survives power loss.
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that writes nothing: ``mode=ro``; where SQLite cannot create the WAL's
    shared-memory file (read-only storage), ``immutable=1``, which is safe there because nobody
    can change the file, as long as no write-ahead log is left unmerged."""
    conn = sqlite3.connect(_uri(path, mode="ro"), uri=True, check_same_thread=False)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_schema").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise StoreError(
            f"{path}: cannot be read here: its write-ahead log {wal.name} was not merged (a "
            "writer was interrupted) and the storage is read-only; open the store once where "
            "it can be written"
        )
    return sqlite3.connect(_uri(path, mode="ro", immutable="1"), uri=True, check_same_thread=False)


def damaged(path: Path, exc: sqlite3.DatabaseError) -> StoreError:
    """The error for a database SQLite cannot read."""
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return StoreError(f"{path}: {exc}")
    return StoreCorruptError(f"{path}: damaged: {exc}")


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the store at ``path``, refused unless it is this format version's."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise StoreError(f"{path}: not an icl_cl store (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreCorruptError(f"{manifest_path}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict):
        raise StoreCorruptError(f"{manifest_path}: unreadable manifest: not a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')!r} written by {manifest.get('created_by')!r}; "
            f"this icl_cl reads {FORMAT!r} version {FORMAT_VERSION} only"
        )
    dim = manifest.get("dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise StoreCorruptError(f"{manifest_path}: dim must be a positive integer, got {dim!r}")
    return manifest


def open_database(
    path: Path, read_only: bool | None, *, check: bool = True
) -> tuple[dict[str, Any], sqlite3.Connection, bool]:
    """Open the files of the store at ``path``, creating none: the manifest, a connection to the
    database, and whether that connection is read-only.

    A forget interrupted by a crash is finished (committed) or undone (not) first, and with
    ``check`` the store passes :func:`check_quick`.

    Args:
        read_only: Connect without writing (``None``: when the directory or the database
            cannot be written).
    """
    manifest = read_manifest(path)
    for name in (DATABASE, VECTORS):
        if not (path / name).is_file():
            raise StoreCorruptError(f"{path / name}: missing (the store is damaged)")
    if read_only is None:
        read_only = not all(os.access(p, os.W_OK) for p in (path, path / DATABASE))
    try:
        conn = connect_read_only(path / DATABASE) if read_only else connect(path / DATABASE)
    except sqlite3.DatabaseError as exc:
        raise damaged(path / DATABASE, exc) from exc
    try:
        finish_vector_swap(path, conn, VECTORS, read_only=read_only or not check)
        if check:
            check_quick(conn, path, int(manifest["dim"]))
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise damaged(path / DATABASE, exc) from exc
    except BaseException:
        conn.close()
        raise
    return manifest, conn, read_only


def create_files(path: Path, *, dim: int, embedder: str, config: dict[str, Any]) -> None:
    """Create the files of a new, empty store at ``path`` (absent, or an empty directory).

    The store is built in a sibling temporary directory and renamed into place, so a crash
    never leaves a half-created store behind.
    """
    from icl_cl._version import __version__

    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StoreError(f"{path}: exists and is not an empty directory or a store")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.creating-", dir=path.parent))
    except OSError as exc:
        raise StoreError(f"{path}: cannot create a store here: {exc.strerror}") from exc
    try:
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": f"icl_cl {__version__}",
            "embedder": embedder,
            "dim": dim,
        }
        _create_database(tmp / DATABASE, config)
        (tmp / VECTORS).touch()
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        os.rename(tmp, path)  # replaces an empty directory atomically on POSIX
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _create_database(file: Path, config: dict[str, Any]) -> None:
    """The database of a new store: schema and first meta values, sealed."""
    conn = connect(file, mode="rwc")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
    conn.executescript(_SCHEMA)
    with transaction(conn):
        conn.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?)",
            [
                ("format_version", str(FORMAT_VERSION)),
                ("config", json.dumps(config, sort_keys=True)),
                ("multi_label", "null"),
                (ITEM_STATISTICS, "true"),
            ],
        )
        seal(conn, "meta", ["format_version", "config", "multi_label", ITEM_STATISTICS])
        seal_schema(conn)
    conn.close()


def check_quick(conn: sqlite3.Connection, path: Path, dim: int) -> None:
    """What opening checks: the database answers, the manifest's dimension is the one the
    stored statistics have, and the last session's vectors match their checksum."""
    conn.execute("SELECT COUNT(*) FROM meta").fetchone()
    lengths = conn.execute("SELECT length(total), length(vector) FROM labels LIMIT 1").fetchone()
    if lengths is not None and tuple(lengths) != (8 * dim, 4 * dim):
        raise StoreCorruptError(
            f"{path / MANIFEST}: says dim {dim}, but the stored label statistics "
            f"have {lengths[0] // 8} dimensions (manifest or database damaged)"
        )
    last = conn.execute(
        "SELECT session, first_row, n_rows, sha256 FROM blocks WHERE n_rows > 0 "
        "ORDER BY session DESC LIMIT 1"
    ).fetchone()
    if last is not None:
        check_blocks(path / VECTORS, dim, [tuple(last)])


@contextlib.contextmanager
def exclusive(path: Path, timeout: float) -> Iterator[None]:
    """The store's writer lock (``flock`` on ``writer.lock``), waiting up to ``timeout`` s."""
    with open(path / LOCK, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as exc:
                if time.monotonic() >= deadline:
                    waited = f" (waited {timeout:g} s)" if timeout > 0 else ""
                    raise StoreBusyError(
                        f"{path}: another process is learning into this store{waited}"
                    ) from exc
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
