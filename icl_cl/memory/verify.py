"""The full check of a store (``icl-cl verify``); it only reads (read-only storage is fine).

Opening a store checks the last session's vectors, and reads check what they return (see
:mod:`icl_cl.memory.checksums`); this checks everything, hashing every block again:

- the database: SQLite's integrity check, and the application id and format in its header;
- the checksum (seal) of the schema and of every sealed unit of every table: a row, or a
  session's example rows; a unit without a seal, or a seal without its unit, is a problem too;
- the vector file: every session's block against its checksum, blocks that follow each other
  from row 0 and hold each session's examples, and a file as long as the committed rows;
- the statistics: counts, sums and Gram matrices recomputed from the stored vectors and labels
  (the same running sums a learn adds, over items in a multi-label store), and every value
  finite.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.errors import StoreError
from icl_cl.memory.checksums import (
    SCHEMA_SEAL,
    SEALED,
    check_block,
    schema_digest,
    unit_digests,
    unit_problem,
)
from icl_cl.memory.example_index import UncheckedIndexError, saved_index_bytes
from icl_cl.memory.item_groups import add_rows
from icl_cl.memory.statistics import RunningStatistics
from icl_cl.memory.store import APPLICATION_ID, FORMAT_VERSION, ITEM_STATISTICS, VECTORS, Store

# Recomputed sums may differ from the stored running ones by float rounding only.
_TOLERANCE = 1e-7
# Problems listed per check before the rest are counted.
_SHOWN = 10


@dataclass
class VerifyReport:
    """What ``verify_store`` found.

    Attributes:
        path: The store.
        sessions: Sessions in the store.
        examples: Committed examples.
        vectors_checked: Vectors whose block checksum was checked.
        problems: Everything found wrong, each naming the file and the part; empty when all is
            well.
        notes: Findings that are not damage (rows of an unfinished session, to be truncated).
        seconds: Time per check, and ``total``.
    """

    path: str
    sessions: int = 0
    examples: int = 0
    vectors_checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.path,
            "ok": self.ok,
            "sessions": self.sessions,
            "examples": self.examples,
            "vectors_checked": self.vectors_checked,
            "problems": self.problems,
            "notes": self.notes,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def verify_store(path: str | Path) -> VerifyReport:
    """Check every part of the store at ``path`` (see the module); never writes.

    Raises:
        StoreError: ``path`` is not a store of this format (damage is reported, not raised).
    """
    start = time.perf_counter()
    report = VerifyReport(str(path))
    try:
        store = Store.open(path, check=False)
    except StoreError as exc:
        if type(exc) is StoreError:  # not a store, or another version: nothing to check
            raise
        report.problems.append(str(exc))
        return report
    try:
        for name, check in (
            ("database", _check_database),
            ("seals", _check_seals),
            ("blocks", _check_blocks),
            ("statistics", _check_statistics),
            ("derived", _check_derived),
        ):
            begun = time.perf_counter()
            try:
                check(store, report)
            except (sqlite3.DatabaseError, StoreError, ValueError) as exc:
                report.problems.append(f"{store.path}: {name} could not be read: {exc}")
            report.seconds[name] = time.perf_counter() - begun
    finally:
        store.close()
    report.seconds["total"] = time.perf_counter() - start
    return report


def _check_derived(store: Store, report: VerifyReport) -> None:
    """The feature spaces' files (derived from the stored vectors, see
    :mod:`~icl_cl.memory.feature_checkpoint`): the learner state readable whole (each member's
    CRC), the solved weights matching their header's SHA-256; each saved HNSW index matching
    its SHA-256. Damage there loses nothing: it is solved or rebuilt in memory on use, and the
    next learn or fit rewrites it."""
    found = []
    for state in sorted(Path(store.path).glob("features-*.npz")):
        try:
            with np.load(state, allow_pickle=False) as data:
                for name in data.files:
                    data[name]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            found.append(f"{state}: unreadable ({exc}); derived: rebuilt from the vectors on use")
    for header in sorted(Path(store.path).glob("features-*.solved.json")):
        weights = header.with_suffix(".npy")
        try:
            expected = json.loads(header.read_text())["sha256"]
            table = np.load(weights, allow_pickle=False)
            ok = hashlib.sha256(np.ascontiguousarray(table).tobytes()).hexdigest() == expected
        except (OSError, ValueError, KeyError) as exc:
            ok, expected = False, str(exc)
        if not ok:
            found.append(f"{weights}: does not match its header; derived: solved again on use")
    for index in sorted(Path(store.path).glob("*.hnsw")):
        try:
            saved_index_bytes(index)
        except UncheckedIndexError as exc:  # not damage: rebuilt on use, rewritten by a learn
            report.notes.append(f"{index}: {exc}; derived: rebuilt from the vectors on use")
        except (OSError, ValueError) as exc:
            found.append(f"{index}: {exc}; derived: rebuilt from the vectors on use")
    _add(report, found, "derived files with problems")


def _add(report: VerifyReport, found: list[str], what: str) -> None:
    """Add ``found`` problems, the first few in full and the rest as a count."""
    report.problems.extend(found[:_SHOWN])
    if len(found) > _SHOWN:
        report.problems.append(f"... and {len(found) - _SHOWN} more {what}")


def _conn(store: Store) -> sqlite3.Connection:
    return store._conn  # the store's own read-only connection


def _check_database(store: Store, report: VerifyReport) -> None:
    conn = _conn(store)
    found = [r[0] for r in conn.execute("PRAGMA integrity_check") if r[0] != "ok"]
    _add(report, [f"{store.path / 'store.sqlite'}: {m}" for m in found], "integrity messages")
    for pragma, expected in (("application_id", APPLICATION_ID), ("user_version", FORMAT_VERSION)):
        value = conn.execute(f"PRAGMA {pragma}").fetchone()[0]
        if value != expected:
            report.problems.append(
                f"{store.path / 'store.sqlite'}: header {pragma} is {value}, not {expected}"
            )


def _check_seals(store: Store, report: VerifyReport) -> None:
    conn = _conn(store)
    database = store.path / "store.sqlite"
    seals: dict[str, dict[str, str]] = {}
    for table, unit, digest in conn.execute("SELECT tbl, unit, sha256 FROM seals"):
        seals.setdefault(table, {})[unit] = digest
    if seals.pop(SCHEMA_SEAL[0], {}).get(SCHEMA_SEAL[1]) != schema_digest(conn):
        report.problems.append(f"{database}: the schema does not match its checksum")
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema")}
    found: list[str] = []
    for table in [t for t in seals if t not in SEALED]:
        found.append(f"{database}: checksums of an unknown table {table!r}")
    for table in SEALED:
        actual = unit_digests(conn, table) if table in tables else {}
        sealed = seals.get(table, {})
        for unit in sorted(actual.keys() | sealed.keys()):
            problem = unit_problem(table, unit, actual.get(unit), sealed.get(unit))
            if problem:
                found.append(f"{database}: {problem}")
    _add(report, found, "units that do not match their checksums")


def _check_blocks(store: Store, report: VerifyReport) -> None:
    conn = _conn(store)
    file = store.path / VECTORS
    blocks = conn.execute(
        "SELECT session, first_row, n_rows, sha256 FROM blocks ORDER BY session"
    ).fetchall()
    # A session's rows: those it learned, less those forgotten since (memory.forgetting).
    edited = any(c[1] == "forgotten" for c in conn.execute("PRAGMA table_info(sessions)"))
    stored = "n_examples - COALESCE(forgotten, 0)" if edited else "n_examples"
    sessions = dict(conn.execute(f"SELECT session, {stored} FROM sessions"))
    by_session = {
        s: (lo, hi, n)
        for s, lo, hi, n in conn.execute(
            "SELECT session, MIN(row), MAX(row), COUNT(*) FROM examples GROUP BY session"
        )
    }
    report.sessions, report.examples = len(sessions), store.n_examples()
    found: list[str] = []
    if {b[0] for b in blocks} != set(sessions):
        found.append(f"{file}: the blocks of vectors do not list exactly the stored sessions")
    next_row = 0
    for session, first_row, n_rows, digest in blocks:
        rows = by_session.get(session, (first_row, first_row + n_rows - 1, 0))
        if first_row != next_row or n_rows != sessions.get(session) or rows[2] != n_rows:
            found.append(
                f"{file}: session {session}'s block (rows {first_row}+{n_rows}) does not follow "
                f"the previous one or disagrees with the session's {sessions.get(session)} "
                f"examples ({rows[2]} stored)"
            )
        elif n_rows and (rows[0], rows[1]) != (first_row, first_row + n_rows - 1):
            found.append(f"{file}: session {session}'s example rows are not its block's rows")
        problem = (
            check_block(file, store.dim, session, first_row, n_rows, digest) if n_rows else None
        )
        if problem:
            found.append(problem)
        report.vectors_checked += n_rows
        next_row = first_row + n_rows
    size, expected = file.stat().st_size, report.examples * 4 * store.dim
    if size < expected:
        found.append(f"{file}: {size} bytes, but the committed vectors need {expected}")
    elif size > expected:
        report.notes.append(
            f"{file}: {size - expected} bytes after the committed vectors (an unfinished "
            "session's, ignored; the next learn truncates them)"
        )
    _add(report, found, "blocks with problems")


def _check_statistics(store: Store, report: VerifyReport) -> None:
    stats, _labels, label_vectors = store.load_statistics()
    vectors = store.load_vectors()
    row_labels = store.row_labels()[: len(vectors)]
    found: list[str] = []
    bad_rows = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad_rows):
        found.append(f"{store.path / VECTORS}: rows {bad_rows[:5].tolist()} are not finite")
    if not np.isfinite(label_vectors).all():
        found.append(f"{store.path / 'store.sqlite'}: label vectors with NaN or infinite values")
    unknown = sorted({lab for labs in row_labels for lab in labs} - set(stats.labels))
    if unknown:
        found.append(f"{store.path / 'store.sqlite'}: examples carry unknown labels {unknown[:5]}")
    if found:
        _add(report, found, "statistics problems")
        return
    # A multi-label store counts each item once; one written before that counted every row.
    items = bool(store.meta("multi_label")) and store.meta(ITEM_STATISTICS) is not None
    if store.meta("multi_label") and not items:
        report.notes.append(
            f"{store.path / 'store.sqlite'}: multi-label statistics of an earlier version (each "
            "copy of an input counted apart): checked as such; opening recomputes them as "
            "items, and the next session stores those"
        )
    again = RunningStatistics(store.dim)
    inputs = store.input_keys()[: len(vectors)] if items else [None] * len(vectors)
    add_rows(again, vectors, row_labels, inputs)
    cols = [stats.col[lab] for lab in again.labels]
    checks: list[tuple[str, Callable[[], bool]]] = [
        ("counts", lambda: np.array_equal(stats.counts[cols], again.counts)),
        ("sums", lambda: _close(stats.sums[cols], again.sums)),
        ("gram", lambda: _close(stats.gram, again.gram)),
        ("weighted_gram", lambda: _close(stats.weighted_gram, again.weighted_gram)),
    ]
    idle = [lab for lab in stats.labels if lab not in again.col]
    if any(stats.counts[stats.col[lab]] or stats.sums[stats.col[lab]].any() for lab in idle):
        found.append("labels without stored examples have counts or sums")
    found += [
        f"stored {name} differ from those of the stored vectors" for name, ok in checks if not ok()
    ]
    _add(report, [f"{store.path / 'store.sqlite'}: {m}" for m in found], "statistics problems")


def _close(stored: np.ndarray, recomputed: np.ndarray) -> bool:
    return stored.shape == recomputed.shape and bool(
        np.allclose(stored, recomputed, rtol=_TOLERANCE, atol=_TOLERANCE)
    )
