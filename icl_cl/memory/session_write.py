"""The write path of one learned session: what :meth:`Store.commit_session` puts on disk.

First :func:`append_vectors` appends the session's vectors to ``examples.f32`` after the last
committed row and fsyncs them; then, inside the one transaction whose commit acknowledges the
session, :func:`write_session` writes the new labels and the touched labels' totals, the example
rows and their images, the statistics, the session's row and its block of vectors, each sealed
with its checksum. Kept apart from :class:`~icl_cl.memory.store.Store`, which decides the
session's number, holds the writer lock and owns the transaction (see :mod:`icl_cl.memory.store`
for the crash story).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from icl_cl.memory.checksums import VERIFIED_BLOCKS, block_digest, seal, seal_schema
from icl_cl.memory.statistics import RunningStatistics, StatisticsDelta
from icl_cl.memory.store_files import IMAGE_SCHEMA, ITEM_STATISTICS, VECTORS, has_images
from icl_cl.types import Example, Label


def append_vectors(path: Path, dim: int, n_committed: int, vectors: np.ndarray) -> str:
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


def write_session(
    conn: sqlite3.Connection,
    session: int,
    block: tuple[int, str],
    *,
    examples: Sequence[Example],
    labels: tuple[Sequence[Label], np.ndarray],
    delta: StatisticsDelta,
    stats: RunningStatistics,
    multi_label: bool | None,
    seconds: float,
    rewrite: bool = False,
) -> None:
    """Write session ``session`` in the open transaction, everything sealed.

    Args:
        block: The first row of its vectors in ``examples.f32`` and their checksum.
        labels: The new labels and their text vectors.
        stats: The statistics before ``delta``; with ``rewrite`` they were recomputed and every
            label's totals are written, else the touched labels' only.
    """
    n_before, digest = block
    cols = _write_labels(conn, session, labels, delta, stats, rewrite)
    _write_examples(conn, session, examples, n_before)
    _write_statistics(conn, stats, delta, multi_label, rewrite)
    _write_session_row(conn, session, (n_before, len(examples)), labels[0], digest, seconds)
    seal(conn, "labels", cols)


def _write_session_row(
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
    if not has_images(conn):
        # Transactional DDL: rolled back with the session if anything fails.
        conn.execute(IMAGE_SCHEMA)
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
