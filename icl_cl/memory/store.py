"""Persistent store of the ECL: a directory with SQLite (WAL) and an append-only vector file.

Layout::

    store/
      manifest.json   format version, embedder and dimension (written once, atomically)
      store.sqlite    labels (with running counts and sums), examples, sessions, statistics, config
      examples.f32    example vectors, float32, one row per example in insertion order
      writer.lock     held while a session is being learned

A session is acknowledged when its SQLite transaction commits. Vectors are appended and fsynced
*before* that commit, and the committed example count says how many rows of ``examples.f32`` are
valid, so a crash at any point leaves the last acknowledged state readable: extra rows from an
unfinished session are ignored on open and truncated by the next learn.

Integrity: each session's block of ``examples.f32`` has a SHA-256 in ``blocks``, and every unit
of the database a write touches (a row; for ``examples``, a session's rows; the schema) has a
SHA-256 of its content in ``seals``, both written in the same transaction as what they cover.
Opening checks the last session's block and the dimension; the reads that predictions use (the
vectors, the label and statistics rows, fitted parameters, meta values) check what they return
against its checksum first (once per block and process for vectors); ``verify.verify_store``
checks all.

A store on storage that cannot be written (or opened with ``read_only=True``) is opened through
SQLite's read-only URI (``mode=ro``, or ``immutable=1`` where SQLite cannot even create its
shared-memory file); opening never creates a file.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.errors import StoreBusyError, StoreCorruptError, StoreError
from icl_cl.images import Image
from icl_cl.inputs.checks import check_vectors
from icl_cl.memory.checksums import (
    VERIFIED_BLOCKS,
    block_digest,
    check_blocks,
    read_sealed,
    seal,
    seal_schema,
)
from icl_cl.memory.idempotency import stored_session, write_idempotency
from icl_cl.memory.statistics import RunningStatistics, StatisticsDelta
from icl_cl.memory.vector_swap import finish as finish_vector_swap
from icl_cl.memory.vector_swap import fsync_dir
from icl_cl.types import Example, Label

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
_IMAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (key TEXT PRIMARY KEY, data BLOB NOT NULL, source TEXT NOT NULL);
"""


@dataclass(frozen=True)
class SessionRecord:
    """One learned session, as listed by ``info``."""

    session: int
    created_at: str
    n_examples: int
    new_labels: tuple[str, ...]
    seconds: float


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _uri(path: Path, **params: str) -> str:
    query = "&".join(f"{key}={value}" for key, value in params.items())
    return f"file:{urllib.parse.quote(str(path.resolve()))}?{query}"


def _connect(path: Path, mode: str = "rw") -> sqlite3.Connection:
    """A writing connection; ``mode=rw`` never creates the file (``rwc`` does, for a new store)."""
    conn = sqlite3.connect(
        _uri(path, mode=mode), uri=True, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when it returns, so an acknowledged session survives power loss.
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _connect_read_only(path: Path) -> sqlite3.Connection:
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


def _read_manifest(path: Path) -> dict[str, Any]:
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


def _damaged(path: Path, exc: sqlite3.DatabaseError) -> StoreError:
    """The error for a database SQLite cannot read."""
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return StoreError(f"{path}: {exc}")
    return StoreCorruptError(f"{path}: damaged: {exc}")


class Store:
    """Reads and writes one store directory. Use :meth:`create` or :meth:`open`.

    Attributes:
        read_only: Opened without the right (or the wish) to write; writes are refused.
        check_reads: Reads check what they return against its checksum (off for ``verify``,
            which checks everything itself).
    """

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        manifest: dict[str, Any],
        *,
        read_only: bool = False,
    ) -> None:
        self.path = path
        self._conn = conn
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self.read_only = read_only
        self.check_reads = True
        self._images: dict[str, Image] = {}
        self._idempotency: tuple[str, str] | None = None  # see idempotency_key
        self._lock_depth = 0
        # The last session and row count of the statistics last loaded (or committed) here.
        self._loaded: tuple[int, int] | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, *, dim: int, embedder: str, config: dict[str, Any]) -> Store:
        """Create a new, empty store at ``path`` (which must not exist or be an empty directory).

        The store is built in a sibling temporary directory and renamed into place, so a crash
        never leaves a half-created store behind.
        """
        from icl_cl._version import __version__

        path = Path(path)
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
            conn = _connect(tmp / DATABASE, mode="rwc")
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
            (tmp / VECTORS).touch()
            write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
            os.rename(tmp, path)  # replaces an empty directory atomically on POSIX
            fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path, *, read_only: bool | None = None, check: bool = True) -> Store:
        """Open an existing store; refuses stores of another format version. Creates no file.

        Args:
            path: The store directory.
            read_only: Open without writing (``None``: when the directory or the database
                cannot be written).
            check: Check the dimension and the last session's block of vectors against its
                checksum, and what reads return against theirs (``False`` for
                :func:`icl_cl.memory.verify.verify_store`, which checks everything).

        Raises:
            StoreError: Not a store, or another format version.
            StoreCorruptError: A file is missing, or disagrees with the others or its checksum.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        for name in (DATABASE, VECTORS):
            if not (path / name).is_file():
                raise StoreCorruptError(f"{path / name}: missing (the store is damaged)")
        if read_only is None:
            read_only = not all(os.access(p, os.W_OK) for p in (path, path / DATABASE))
        try:
            conn = _connect_read_only(path / DATABASE) if read_only else _connect(path / DATABASE)
        except sqlite3.DatabaseError as exc:
            raise _damaged(path / DATABASE, exc) from exc
        store = cls(path, conn, manifest, read_only=read_only)
        store.check_reads = check
        try:
            # A forget interrupted by a crash is finished (committed) or undone (not) first.
            finish_vector_swap(path, conn, VECTORS, read_only=read_only or not check)
            if check:
                store.check_quick()
        except sqlite3.DatabaseError as exc:
            store.close()
            raise _damaged(path / DATABASE, exc) from exc
        except BaseException:
            store.close()
            raise
        return store

    def check_quick(self) -> None:
        """What opening checks (see :func:`_check_quick`)."""
        _check_quick(self._conn, self.path, self.dim)

    def close(self) -> None:
        self._conn.close()

    def require_writable(self) -> None:
        """Refuse (:class:`StoreError`) when the store was opened read-only."""
        if self.read_only:
            raise StoreError(f"{self.path}: the store is open read-only; nothing can be written")

    @contextlib.contextmanager
    def writer_lock(self, timeout: float = 0.0) -> Iterator[None]:
        """Exclusive lock for the duration of one session (re-entrant within this store).

        Args:
            timeout: Seconds to wait for another writer to finish; 0 fails at once.

        Raises:
            StoreBusyError: Another process still holds the lock after ``timeout``.
        """
        self.require_writable()
        held = contextlib.nullcontext() if self._lock_depth else _exclusive(self.path, timeout)
        with held:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1

    def changed_since_load(self) -> bool:
        """Whether another process committed a session since the statistics were loaded here."""
        return self._loaded is not None and self._loaded != self._position()

    def _position(self) -> tuple[int, int]:
        row = self._conn.execute(
            "SELECT COALESCE(MAX(session), 0), (SELECT COUNT(*) FROM examples) FROM sessions"
        ).fetchone()
        return int(row[0]), int(row[1])

    # ---- reading ---------------------------------------------------------------------------

    def meta(self, key: str) -> Any:
        rows = self._sealed("meta", [key])
        return json.loads(rows[0]["value"]) if rows else None

    def _sealed(self, table: str, units: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Rows of ``table`` (all, or those of ``units``), checked against their seals."""
        source = self.path / DATABASE
        names, rows = read_sealed(self._conn, table, units, source=source, check=self.check_reads)
        return [dict(zip(names, row, strict=True)) for row in rows]

    def n_examples(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0])

    def load_statistics(self) -> tuple[RunningStatistics, list[Label], np.ndarray]:
        """Statistics, labels (column order) and label-text vectors ``(n_labels, dim)``, read in
        one snapshot (a concurrent commit is seen entirely or not at all)."""
        self._conn.execute("BEGIN")
        try:
            loaded = self._read_statistics()
            self._loaded = self._position()
        finally:
            self._conn.execute("COMMIT")
        return loaded

    def _read_statistics(self) -> tuple[RunningStatistics, list[Label], np.ndarray]:
        stats = RunningStatistics(self.dim)
        labels: list[Label] = []
        vectors: list[np.ndarray] = []
        for row in self._sealed("labels"):
            label, count, total, vector = row["label"], row["count"], row["total"], row["vector"]
            if len(total) != 8 * self.dim or len(vector) != 4 * self.dim:
                raise StoreCorruptError(
                    f"{self.path / DATABASE}: label {label!r} has statistics of another "
                    f"dimension than the manifest's {self.dim} (store damaged)"
                )
            stats.add_label(label, count, np.frombuffer(total, dtype=np.float64))
            labels.append(Label(label, row["name"], row["description"], row["grp"]))
            vectors.append(np.frombuffer(vector, dtype=np.float32))
        shapes = {"gram": stats.gram.shape, "weighted_gram": stats.weighted_gram.shape}
        for key, value in ((r["key"], r["value"]) for r in self._sealed("statistics")):
            if key not in shapes:
                continue
            if len(value) != 8 * shapes[key][0] * shapes[key][1]:
                raise StoreCorruptError(
                    f"{self.path / DATABASE}: statistics {key!r} do not have the manifest's "
                    f"dimension {self.dim} (store damaged)"
                )
            setattr(stats, key, np.frombuffer(value, np.float64).reshape(shapes[key]).copy())
        # The Gram's constant corner sums a 1 per counted example: the stored rows, or in a
        # multi-label store its items (copies of an input count once).
        stats.n_examples = int(np.rint(stats.gram[-1, -1]))
        matrix = np.vstack(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        return stats, labels, matrix

    def load_vectors(self) -> np.ndarray:
        """Vectors of the committed examples in row order: as many as the statistics last loaded
        count (all committed ones if none were); ignores rows of an unfinished session."""
        n = self._loaded[1] if self._loaded is not None else self.n_examples()
        file = self.path / VECTORS
        data = bytearray(n * 4 * self.dim)
        with open(file, "rb") as f:
            stat = os.fstat(f.fileno())  # before the read: a later change is checked again
            available = f.readinto(data) // (4 * self.dim)
        if available < n:
            raise StoreCorruptError(
                f"{file}: holds {available} vectors but {n} examples were committed (file damaged)"
            )
        if self.check_reads:
            blocks = _blocks_of(file, self._sealed("blocks"), n)
            check_blocks(file, self.dim, blocks, (stat, memoryview(data)))
        return np.frombuffer(data, dtype=np.float32).reshape(n, self.dim)

    def row_labels(self) -> list[list[str]]:
        """Labels of every stored example, by row."""
        return [
            json.loads(v) for (v,) in self._conn.execute("SELECT labels FROM examples ORDER BY row")
        ]

    def examples(self, rows: Sequence[int]) -> list[Example]:
        """Stored examples by row number, in the order asked."""
        found: dict[int, Example] = {}
        image = "image" if self._has_images() else "NULL"
        for start in range(0, len(rows), 500):
            chunk = [int(r) for r in rows[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT row, id, text, labels, {image} FROM examples WHERE row IN ({marks})"
            for row, id_, text, labels, key in self._conn.execute(query, chunk):
                found[row] = Example(id_, text, json.loads(labels), image=self._image(key))
        return [found[int(r)] for r in rows]

    def input_keys(self) -> list[str]:
        """Per row, what identifies its input: the image key, or the text."""
        column = "COALESCE(image, text)" if self._has_images() else "text"
        return [v for (v,) in self._conn.execute(f"SELECT {column} FROM examples ORDER BY row")]

    def _has_images(self) -> bool:
        return _has_images(self._conn)

    def _image(self, key: str | None) -> Image | None:
        if key is None:
            return None
        if key not in self._images:
            row = self._conn.execute("SELECT data, source FROM images WHERE key = ?", (key,))
            data, source = row.fetchone()
            self._images[key] = Image.from_bytes(data, source)
        return self._images[key]

    def existing_ids(self, ids: Sequence[str]) -> list[str]:
        """Which of ``ids`` are already stored."""
        hits: list[str] = []
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            query = f"SELECT id FROM examples WHERE id IN ({marks})"
            hits.extend(r[0] for r in self._conn.execute(query, chunk))
        return hits

    def sessions(self) -> list[SessionRecord]:
        rows = self._conn.execute(
            "SELECT session, created_at, n_examples, new_labels, seconds FROM sessions ORDER BY session"
        )
        return [SessionRecord(s, c, n, tuple(json.loads(nl)), sec) for s, c, n, nl, sec in rows]

    def label_sessions(self) -> dict[str, int]:
        return dict(self._conn.execute("SELECT label, session FROM labels"))

    def fitted(self, key: str) -> tuple[dict[str, Any], int] | None:
        """Fitted parameters (fusion, calibration) and the example count they were fitted at."""
        rows = self._sealed("fitted", [key])
        return (json.loads(rows[0]["value"]), int(rows[0]["n_examples"])) if rows else None

    def fitted_keys(self, prefix: str) -> list[str]:
        """Keys of the stored fitted parameters that start with ``prefix``."""
        rows = self._conn.execute(
            "SELECT key FROM fitted WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix)
        )
        return [key for (key,) in rows]

    def summaries(self) -> dict[str, str]:
        """InCA class summaries written by the LLM, by label."""
        return dict(self._conn.execute("SELECT label, summary FROM summaries"))

    # ---- writing ---------------------------------------------------------------------------

    def save_fitted(self, key: str, value: dict[str, Any], n_examples: int) -> None:
        self.require_writable()
        with transaction(self._conn):
            self._conn.execute(
                "INSERT OR REPLACE INTO fitted(key, value, n_examples) VALUES (?, ?, ?)",
                (key, json.dumps(value, sort_keys=True), n_examples),
            )
            seal(self._conn, "fitted", [key])

    def save_summaries(self, summaries: dict[str, str], model: str) -> None:
        self.require_writable()
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with transaction(self._conn):
            self._conn.executemany(
                "INSERT OR REPLACE INTO summaries(label, summary, model, created_at) VALUES (?, ?, ?, ?)",
                [(label, text, model, now) for label, text in summaries.items()],
            )
            seal(self._conn, "summaries", list(summaries))

    def commit_session(
        self,
        *,
        examples: Sequence[Example],
        vectors: np.ndarray,
        new_labels: Sequence[Label],
        new_label_vectors: np.ndarray,
        delta: StatisticsDelta,
        stats: RunningStatistics,
        multi_label: bool | None,
        seconds: float,
        rewrite: bool = False,
    ) -> int:
        """Persist one session atomically and return its number.

        ``stats`` is the state *before* the delta, and must be the store's state as it is (a
        session committed meanwhile by another process is refused). The new totals are written
        for touched labels only, so the cost of a session does not grow with the number of
        labels already known. The session's vectors, rows and statistics are sealed with their
        checksums in the same transaction, and inside :meth:`idempotency_key` the key too. With
        ``rewrite``, ``stats`` were recomputed (see :data:`ITEM_STATISTICS`): all are written.
        """
        self.require_writable()
        check_vectors(vectors, [ex.id for ex in examples])
        check_vectors(new_label_vectors, [lab.label for lab in new_labels])
        with self.writer_lock():
            if self.changed_since_load():
                raise StoreError(
                    f"{self.path}: another process learned a session since this store was "
                    "loaded; reopen it and learn again"
                )
            last_session, n_before = self._position()
            session = last_session + 1
            digest = _append_vectors(self.path, self.dim, n_before, vectors)
            with transaction(self._conn):
                labels = (new_labels, new_label_vectors)
                cols = _write_labels(self._conn, session, labels, delta, stats, rewrite)
                _write_examples(self._conn, session, examples, n_before)
                _write_statistics(self._conn, stats, delta, multi_label, rewrite)
                _write_session(
                    self._conn, session, (n_before, len(examples)), new_labels, digest, seconds
                )
                seal(self._conn, "labels", cols)
                if self._idempotency is not None:
                    write_idempotency(self._conn, *self._idempotency, session)
            self._loaded = (session, n_before + len(examples))
        return session

    @contextlib.contextmanager
    def idempotency_key(self, key: str, digest: str) -> Iterator[None]:
        """Store idempotency ``key`` and its request's ``digest`` with the session committed in
        this block, in its transaction: the key is stored if and only if its session is."""
        self._idempotency = (key, digest)
        try:
            yield
        finally:
            self._idempotency = None

    @property
    def pending_idempotency(self) -> tuple[str, str] | None:
        """The key and digest :meth:`idempotency_key` holds now, for another kind of session."""
        return self._idempotency

    def idempotent_session(self, key: str) -> tuple[str, SessionRecord] | None:
        """The digest of the request stored under idempotency ``key`` and the session it made."""
        found = stored_session(self._conn, key)
        if found is None:
            return None
        return found[0], next(s for s in self.sessions() if s.session == found[1])


def _check_quick(conn: sqlite3.Connection, path: Path, dim: int) -> None:
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


def _blocks_of(file: Path, rows: list[dict[str, Any]], n: int) -> list[tuple[int, int, int, str]]:
    """The blocks ``(session, first_row, n_rows, sha256)`` that hold rows 0 to ``n - 1`` of the
    vector file, from the rows of ``blocks`` in session order; they must follow each other."""
    blocks: list[tuple[int, int, int, str]] = []
    end = 0
    for row in rows:
        if row["n_rows"] == 0 or row["first_row"] >= n:  # empty, or committed after the load
            continue
        if row["first_row"] != end:
            break
        blocks.append((row["session"], row["first_row"], row["n_rows"], row["sha256"]))
        end += row["n_rows"]
    if end != n:
        raise StoreCorruptError(
            f"{file}: the blocks of vectors do not hold exactly the {n} committed rows (store "
            f"damaged); icl-cl verify --store {file.parent} checks all"
        )
    return blocks


def _append_vectors(path: Path, dim: int, n_committed: int, vectors: np.ndarray) -> str:
    """Append after the last committed row (dropping leftovers of a crashed session), fsync;
    returns the block's checksum."""
    data = np.ascontiguousarray(vectors, dtype=np.float32).tobytes()
    with open(path / VECTORS, "r+b") as f:
        before = os.fstat(f.fileno())
        f.truncate(n_committed * 4 * dim)
        f.seek(n_committed * 4 * dim)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        VERIFIED_BLOCKS.appended(before, os.fstat(f.fileno()))  # its checked blocks stay so
    return block_digest(data)


def _write_session(
    conn: sqlite3.Connection,
    session: int,
    block: tuple[int, int],
    new_labels: Sequence[Label],
    digest: str,
    seconds: float,
) -> None:
    """The session's row and its block of vectors (first row, rows), sealed."""
    conn.execute(
        "INSERT INTO sessions(session, created_at, n_examples, new_labels, seconds)"
        " VALUES (?, ?, ?, ?, ?)",
        (
            session,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            block[1],
            json.dumps([lab.label for lab in new_labels]),
            seconds,
        ),
    )
    conn.execute(
        "INSERT INTO blocks(session, first_row, n_rows, sha256) VALUES (?, ?, ?, ?)",
        (session, *block, digest),
    )
    seal(conn, "sessions", [session])
    seal(conn, "blocks", [session])


def _write_labels(
    conn: sqlite3.Connection,
    session: int,
    labels: tuple[Sequence[Label], np.ndarray],
    delta: StatisticsDelta,
    stats: RunningStatistics,
    rewrite: bool = False,
) -> list[int]:
    """Insert the new labels and update the touched ones' totals (with ``rewrite``, every
    label's); returns every column written. ``labels``: the new labels and their vectors."""
    new_labels, new_label_vectors = labels
    n_old_labels = len(stats.labels)
    conn.executemany(
        "INSERT INTO labels(col, label, name, description, grp, session, count, total, vector)"
        " VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
        [
            (
                n_old_labels + i,
                lab.label,
                lab.name,
                lab.description,
                lab.group,
                session,
                np.zeros(stats.dim).tobytes(),
                new_label_vectors[i].astype(np.float32).tobytes(),
            )
            for i, lab in enumerate(new_labels)
        ],
    )
    totals: dict[int, tuple[int, np.ndarray]] = {}
    if rewrite:
        totals = {c: (int(stats.counts[c]), stats.sums[c]) for c in range(n_old_labels)}
    for col, count, total in zip(delta.cols, delta.counts, delta.sums, strict=True):
        if col < n_old_labels:
            count = count + stats.counts[col]
            total = total + stats.sums[col]
        totals[int(col)] = (int(count), total)
    updates = [
        (count, np.asarray(total, np.float64).tobytes(), col)
        for col, (count, total) in totals.items()
    ]
    conn.executemany("UPDATE labels SET count = ?, total = ? WHERE col = ?", updates)
    return sorted({n_old_labels + i for i in range(len(new_labels))} | {u[2] for u in updates})


def _write_examples(
    conn: sqlite3.Connection, session: int, examples: Sequence[Example], n_before: int
) -> None:
    conn.executemany(
        "INSERT INTO examples(row, id, text, labels, session) VALUES (?, ?, ?, ?, ?)",
        [
            (n_before + i, ex.id, ex.text, json.dumps(list(ex.labels)), session)
            for i, ex in enumerate(examples)
        ],
    )
    _insert_images(conn, examples, n_before)
    seal(conn, "examples", [session])


def _write_statistics(
    conn: sqlite3.Connection,
    stats: RunningStatistics,
    delta: StatisticsDelta,
    multi_label: bool | None,
    rewrite: bool = False,
) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO statistics(key, value) VALUES (?, ?)",
        [
            ("gram", (stats.gram + delta.gram).tobytes()),
            ("weighted_gram", (stats.weighted_gram + delta.weighted_gram).tobytes()),
        ],
    )
    conn.execute("UPDATE meta SET value = ? WHERE key = 'multi_label'", (json.dumps(multi_label),))
    seal(conn, "statistics", ["gram", "weighted_gram"])
    seal(conn, "meta", ["multi_label"])
    if rewrite:
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, 'true')", (ITEM_STATISTICS,)
        )
        seal(conn, "meta", [ITEM_STATISTICS])


def _insert_images(conn: sqlite3.Connection, examples: Sequence[Example], n_before: int) -> None:
    """Store the images of ``examples`` (rows from ``n_before``); inside the session's
    transaction, so the images and their rows commit together."""
    with_images = [(n_before + i, ex.image) for i, ex in enumerate(examples) if ex.image]
    if not with_images:
        return
    if not _has_images(conn):
        # Transactional DDL: rolled back with the session if anything fails.
        conn.execute(_IMAGE_SCHEMA)
        conn.execute("ALTER TABLE examples ADD COLUMN image TEXT")
        seal_schema(conn)
    conn.executemany(
        "INSERT OR IGNORE INTO images(key, data, source) VALUES (?, ?, ?)",
        [(img.key, img.data, img.source) for _, img in with_images],
    )
    conn.executemany(
        "UPDATE examples SET image = ? WHERE row = ?",
        [(img.key, row) for row, img in with_images],
    )
    seal(conn, "images", sorted({img.key for _, img in with_images}))


@contextlib.contextmanager
def _exclusive(path: Path, timeout: float) -> Iterator[None]:
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


def _has_images(conn: sqlite3.Connection) -> bool:
    return any(c[1] == "image" for c in conn.execute("PRAGMA table_info(examples)").fetchall())


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
