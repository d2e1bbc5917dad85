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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.errors import StoreError
from icl_cl.images import Image
from icl_cl.memory.statistics import RunningStatistics, StatisticsDelta
from icl_cl.types import Example, Label

FORMAT = "icl_cl-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "store.sqlite"
VECTORS = "examples.f32"
LOCK = "writer.lock"

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
"""

# Image examples: the encoded bytes live in the store (demonstrations show them to the LLM, and a
# store must not depend on files elsewhere); an example row names its image by key. Added to a
# store, in the session's transaction, the first time it learns an image.
_IMAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (key TEXT PRIMARY KEY, data BLOB NOT NULL, source TEXT NOT NULL);
"""

# Idempotency keys of the sessions learned through the service: the key, a digest of its request
# and the session it made. Added (in the session's transaction) by the first session that has one,
# so a key is stored if and only if its session is.
_IDEMPOTENCY_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, digest TEXT NOT NULL,
    session INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class SessionRecord:
    """One learned session, as listed by ``info``."""

    session: int
    created_at: str
    n_examples: int
    new_labels: tuple[str, ...]
    seconds: float


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk when it returns, so an acknowledged session survives power loss.
    conn.execute("PRAGMA synchronous=FULL")
    return conn


class Store:
    """Reads and writes one store directory. Use :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, manifest: dict[str, Any]) -> None:
        self.path = path
        self._conn = conn
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self._images: dict[str, Image] = {}
        self._idempotency: tuple[str, str] | None = None  # see idempotency_key

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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.creating-", dir=path.parent))
        try:
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "created_by": f"icl_cl {__version__}",
                "embedder": embedder,
                "dim": dim,
            }
            conn = _connect(tmp / DATABASE)
            conn.executescript(_SCHEMA)
            with _transaction(conn):
                conn.executemany(
                    "INSERT INTO meta(key, value) VALUES (?, ?)",
                    [
                        ("format_version", str(FORMAT_VERSION)),
                        ("config", json.dumps(config, sort_keys=True)),
                        ("multi_label", "null"),
                    ],
                )
            conn.close()
            (tmp / VECTORS).touch()
            write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
            os.rename(tmp, path)  # replaces an empty directory atomically on POSIX
            _fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path) -> Store:
        """Open an existing store; refuses stores of another format version."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise StoreError(f"{path}: not an icl_cl store (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{manifest_path}: unreadable manifest: {exc}") from exc
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path}: store format {manifest.get('format')!r} version "
                f"{manifest.get('format_version')!r} written by {manifest.get('created_by')!r}; "
                f"this icl_cl reads {FORMAT!r} version {FORMAT_VERSION} only"
            )
        conn = _connect(path / DATABASE)
        return cls(path, conn, manifest)

    def close(self) -> None:
        self._conn.close()

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Exclusive lock for the duration of one session; a second writer fails at once."""
        with open(self.path / LOCK, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise StoreError(
                    f"{self.path}: another process is learning into this store"
                ) from exc
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ---- reading ---------------------------------------------------------------------------

    def meta(self, key: str) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def n_examples(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0])

    def load_statistics(self) -> tuple[RunningStatistics, list[Label], np.ndarray]:
        """Statistics, labels (column order) and label-text vectors ``(n_labels, dim)``."""
        stats = RunningStatistics(self.dim)
        labels: list[Label] = []
        vectors: list[np.ndarray] = []
        rows = self._conn.execute(
            "SELECT label, name, description, grp, count, total, vector FROM labels ORDER BY col"
        )
        for label, name, description, group, count, total, vector in rows:
            stats.add_label(label, count, np.frombuffer(total, dtype=np.float64))
            labels.append(Label(label, name=name, description=description, group=group))
            vectors.append(np.frombuffer(vector, dtype=np.float32))
        for key, value in self._conn.execute("SELECT key, value FROM statistics"):
            if key == "gram":
                stats.gram = np.frombuffer(value, np.float64).reshape(stats.gram.shape).copy()
            elif key == "weighted_gram":
                shape = stats.weighted_gram.shape
                stats.weighted_gram = np.frombuffer(value, np.float64).reshape(shape).copy()
        stats.n_examples = self.n_examples()
        matrix = np.vstack(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        return stats, labels, matrix

    def load_vectors(self) -> np.ndarray:
        """Vectors of all committed examples, in row order; ignores rows of an unfinished session."""
        n = self.n_examples()
        file = self.path / VECTORS
        available = file.stat().st_size // (4 * self.dim)
        if available < n:
            raise StoreError(
                f"{file}: holds {available} vectors but {n} examples were committed (file damaged)"
            )
        return np.fromfile(file, dtype=np.float32, count=n * self.dim).reshape(n, self.dim)

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
        columns = self._conn.execute("PRAGMA table_info(examples)").fetchall()
        return any(c[1] == "image" for c in columns)

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
        row = self._conn.execute(
            "SELECT value, n_examples FROM fitted WHERE key = ?", (key,)
        ).fetchone()
        return None if row is None else (json.loads(row[0]), int(row[1]))

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
        with _transaction(self._conn):
            self._conn.execute(
                "INSERT OR REPLACE INTO fitted(key, value, n_examples) VALUES (?, ?, ?)",
                (key, json.dumps(value, sort_keys=True), n_examples),
            )

    def save_summaries(self, summaries: dict[str, str], model: str) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with _transaction(self._conn):
            self._conn.executemany(
                "INSERT OR REPLACE INTO summaries(label, summary, model, created_at) VALUES (?, ?, ?, ?)",
                [(label, text, model, now) for label, text in summaries.items()],
            )

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
    ) -> int:
        """Persist one session atomically and return its number.

        ``stats`` is the state *before* the delta; the new totals are written for touched labels
        only, so the cost of a session does not grow with the number of labels already known.
        Inside :meth:`idempotency_key`, the key is stored with the session.
        """
        n_before = self.n_examples()
        self._append_vectors(n_before, vectors)
        session = int(
            self._conn.execute("SELECT COALESCE(MAX(session), 0) + 1 FROM sessions").fetchone()[0]
        )
        n_old_labels = len(stats.labels)
        with _transaction(self._conn):
            self._conn.executemany(
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
                        np.zeros(self.dim).tobytes(),
                        new_label_vectors[i].astype(np.float32).tobytes(),
                    )
                    for i, lab in enumerate(new_labels)
                ],
            )
            updates = []
            for col, count, total in zip(delta.cols, delta.counts, delta.sums, strict=True):
                if col < n_old_labels:
                    count = count + stats.counts[col]
                    total = total + stats.sums[col]
                updates.append((int(count), np.asarray(total, np.float64).tobytes(), int(col)))
            self._conn.executemany("UPDATE labels SET count = ?, total = ? WHERE col = ?", updates)
            self._conn.executemany(
                "INSERT INTO examples(row, id, text, labels, session) VALUES (?, ?, ?, ?, ?)",
                [
                    (n_before + i, ex.id, ex.text, json.dumps(list(ex.labels)), session)
                    for i, ex in enumerate(examples)
                ],
            )
            self._insert_images(examples, n_before)
            self._conn.executemany(
                "INSERT OR REPLACE INTO statistics(key, value) VALUES (?, ?)",
                [
                    ("gram", (stats.gram + delta.gram).tobytes()),
                    ("weighted_gram", (stats.weighted_gram + delta.weighted_gram).tobytes()),
                ],
            )
            self._conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'multi_label'", (json.dumps(multi_label),)
            )
            self._conn.execute(
                "INSERT INTO sessions(session, created_at, n_examples, new_labels, seconds)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    session,
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    len(examples),
                    json.dumps([lab.label for lab in new_labels]),
                    seconds,
                ),
            )
            if self._idempotency is not None:
                self._conn.execute(_IDEMPOTENCY_SCHEMA)
                self._conn.execute(
                    "INSERT INTO idempotency(key, digest, session) VALUES (?, ?, ?)",
                    (*self._idempotency, session),
                )
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

    def idempotent_session(self, key: str) -> tuple[str, SessionRecord] | None:
        """The digest of the request stored under idempotency ``key`` and the session it made."""
        exists = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'idempotency'"
        ).fetchone()
        row = None
        if exists:
            query = "SELECT digest, session FROM idempotency WHERE key = ?"
            row = self._conn.execute(query, (key,)).fetchone()
        if row is None:
            return None
        digest, session = row
        return digest, next(s for s in self.sessions() if s.session == session)

    def _insert_images(self, examples: Sequence[Example], n_before: int) -> None:
        """Store the images of ``examples`` (rows from ``n_before``); inside the session's
        transaction, so the images and their rows commit together."""
        with_images = [(n_before + i, ex.image) for i, ex in enumerate(examples) if ex.image]
        if not with_images:
            return
        if not self._has_images():
            # Transactional DDL: rolled back with the session if anything fails.
            self._conn.execute(_IMAGE_SCHEMA)
            self._conn.execute("ALTER TABLE examples ADD COLUMN image TEXT")
        self._conn.executemany(
            "INSERT OR IGNORE INTO images(key, data, source) VALUES (?, ?, ?)",
            [(img.key, img.data, img.source) for _, img in with_images],
        )
        self._conn.executemany(
            "UPDATE examples SET image = ? WHERE row = ?",
            [(img.key, row) for row, img in with_images],
        )

    def _append_vectors(self, n_committed: int, vectors: np.ndarray) -> None:
        """Append after the last committed row (dropping leftovers of a crashed session), fsync."""
        with open(self.path / VECTORS, "r+b") as f:
            f.truncate(n_committed * 4 * self.dim)
            f.seek(n_committed * 4 * self.dim)
            f.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
