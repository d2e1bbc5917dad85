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

The store is :class:`Store`, composed of module functions by concern: the files, the format, the
connections, creation and the writer lock in :mod:`~icl_cl.memory.store_files`; the session
write path (append and fsync, then one sealed transaction) in
:mod:`~icl_cl.memory.session_write`; the checked reads in :mod:`~icl_cl.memory.store_reads`;
fitted parameters and class summaries in :mod:`~icl_cl.memory.store_records`; idempotency keys
in :mod:`~icl_cl.memory.idempotency`.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.errors import StoreError
from icl_cl.images import Image
from icl_cl.inputs.checks import check_vectors
from icl_cl.memory import store_reads as reads
from icl_cl.memory import store_records as records
from icl_cl.memory.idempotency import stored_session, write_idempotency
from icl_cl.memory.session_write import append_vectors, write_session
from icl_cl.memory.statistics import RunningStatistics, StatisticsDelta
from icl_cl.memory.store_files import (
    APPLICATION_ID,
    DATABASE,
    FORMAT,
    FORMAT_VERSION,
    ITEM_STATISTICS,
    LOCK,
    MANIFEST,
    VECTORS,
    create_files,
    exclusive,
    open_database,
    transaction,
    write_atomic,
)
from icl_cl.types import Example, Label

# What other modules import from here: the layout's names and the write primitives are defined
# in store_files and are the store's.
__all__ = [
    "APPLICATION_ID",
    "DATABASE",
    "FORMAT",
    "FORMAT_VERSION",
    "ITEM_STATISTICS",
    "LOCK",
    "MANIFEST",
    "VECTORS",
    "SessionRecord",
    "Store",
    "transaction",
    "write_atomic",
]


@dataclass(frozen=True)
class SessionRecord:
    """One learned session, as listed by ``info``."""

    session: int
    created_at: str
    n_examples: int
    new_labels: tuple[str, ...]
    seconds: float


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
        create_files(Path(path), dim=dim, embedder=embedder, config=config)
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
        manifest, conn, read_only = open_database(path, read_only, check=check)
        store = cls(path, conn, manifest, read_only=read_only)
        store.check_reads = check
        return store

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
        held = contextlib.nullcontext() if self._lock_depth else exclusive(self.path, timeout)
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
        return reads.sealed_rows(self._conn, self.path, table, units, check=self.check_reads)

    def n_examples(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0])

    def load_statistics(self) -> tuple[RunningStatistics, list[Label], np.ndarray]:
        """Statistics, labels (column order) and label-text vectors ``(n_labels, dim)``, read in
        one snapshot (a concurrent commit is seen entirely or not at all)."""
        self._conn.execute("BEGIN")
        try:
            loaded = reads.read_statistics(self._conn, self.path, self.dim, check=self.check_reads)
            self._loaded = self._position()
        finally:
            self._conn.execute("COMMIT")
        return loaded

    def load_vectors(self) -> np.ndarray:
        """Vectors of the committed examples in row order: as many as the statistics last loaded
        count (all committed ones if none were); ignores rows of an unfinished session."""
        n = self._loaded[1] if self._loaded is not None else self.n_examples()
        return reads.read_vectors(self._conn, self.path, self.dim, n, check=self.check_reads)

    def row_labels(self) -> list[list[str]]:
        """Labels of every stored example, by row."""
        return reads.row_labels(self._conn)

    def examples(self, rows: Sequence[int]) -> list[Example]:
        """Stored examples by row number, in the order asked."""
        return reads.examples(self._conn, rows, self._images)

    def input_keys(self) -> list[str]:
        """Per row, what identifies its input: the image key, or the text."""
        return reads.input_keys(self._conn)

    def existing_ids(self, ids: Sequence[str]) -> list[str]:
        """Which of ``ids`` are already stored."""
        return reads.existing_ids(self._conn, ids)

    def sessions(self) -> list[SessionRecord]:
        rows = self._conn.execute(
            "SELECT session, created_at, n_examples, new_labels, seconds FROM sessions ORDER BY session"
        )
        return [SessionRecord(s, c, n, tuple(json.loads(nl)), sec) for s, c, n, nl, sec in rows]

    def label_sessions(self) -> dict[str, int]:
        return dict(self._conn.execute("SELECT label, session FROM labels"))

    def fitted(self, key: str) -> tuple[dict[str, Any], int] | None:
        """Parameters fitted under ``key`` and the example count they were fitted at."""
        return records.fitted(self._conn, self.path, key, check=self.check_reads)

    def fitted_keys(self, prefix: str) -> list[str]:
        """Keys of the stored fitted parameters that start with ``prefix``."""
        return records.fitted_keys(self._conn, prefix)

    def summaries(self) -> dict[str, str]:
        """InCA class summaries written by the LLM, by label."""
        return records.summaries(self._conn)

    # ---- writing ---------------------------------------------------------------------------

    def save_fitted(self, key: str, value: dict[str, Any], n_examples: int) -> None:
        self.require_writable()
        records.save_fitted(self._conn, key, value, n_examples)

    def save_summaries(self, summaries: dict[str, str], model: str) -> None:
        self.require_writable()
        records.save_summaries(self._conn, summaries, model)

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
            # On disk (fsynced) before the transaction that counts them commits.
            digest = append_vectors(self.path, self.dim, n_before, vectors)
            with transaction(self._conn):
                write_session(
                    self._conn,
                    session,
                    (n_before, digest),
                    examples=examples,
                    labels=(new_labels, new_label_vectors),
                    delta=delta,
                    stats=stats,
                    multi_label=multi_label,
                    seconds=seconds,
                    rewrite=rewrite,
                )
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
