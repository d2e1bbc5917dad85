"""The reads of what a store holds: its sealed rows, the label statistics, the vectors, and the
stored examples with their images, input keys and ids.

Module functions over the store's connection, called by :class:`~icl_cl.memory.store.Store`
(which holds the connection, the image cache and the row count last loaded). The reads that
predictions use check what they return against its checksum (``check``): the sealed rows
against their seals, the vectors against their blocks' SHA-256 (see
:mod:`icl_cl.memory.checksums`).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.errors import StoreCorruptError
from icl_cl.images import Image
from icl_cl.memory.checksums import check_blocks, read_sealed
from icl_cl.memory.statistics import RunningStatistics
from icl_cl.memory.store_files import DATABASE, VECTORS, has_images
from icl_cl.types import Example, Label

_CHUNK = 500  # ids or rows per query (SQLite limits a statement's parameters)


def sealed_rows(
    conn: sqlite3.Connection,
    path: Path,
    table: str,
    units: Sequence[Any] | None = None,
    *,
    check: bool = True,
) -> list[dict[str, Any]]:
    """Rows of ``table`` (all, or those of ``units``) of the store at ``path``, by column name,
    checked against their seals (with ``check``)."""
    names, rows = read_sealed(conn, table, units, source=path / DATABASE, check=check)
    return [dict(zip(names, row, strict=True)) for row in rows]


def read_statistics(
    conn: sqlite3.Connection, path: Path, dim: int, *, check: bool = True
) -> tuple[RunningStatistics, list[Label], np.ndarray]:
    """Statistics, labels (column order) and label-text vectors ``(n_labels, dim)``."""
    stats = RunningStatistics(dim)
    labels: list[Label] = []
    vectors: list[np.ndarray] = []
    for row in sealed_rows(conn, path, "labels", check=check):
        label, count, total, vector = row["label"], row["count"], row["total"], row["vector"]
        if len(total) != 8 * dim or len(vector) != 4 * dim:
            raise StoreCorruptError(
                f"{path / DATABASE}: label {label!r} has statistics of another "
                f"dimension than the manifest's {dim} (store damaged)"
            )
        stats.add_label(label, count, np.frombuffer(total, dtype=np.float64))
        labels.append(Label(label, row["name"], row["description"], row["grp"]))
        vectors.append(np.frombuffer(vector, dtype=np.float32))
    shapes = {"gram": stats.gram.shape, "weighted_gram": stats.weighted_gram.shape}
    for row in sealed_rows(conn, path, "statistics", check=check):
        key, value = row["key"], row["value"]
        if key not in shapes:
            continue
        if len(value) != 8 * shapes[key][0] * shapes[key][1]:
            raise StoreCorruptError(
                f"{path / DATABASE}: statistics {key!r} do not have the manifest's "
                f"dimension {dim} (store damaged)"
            )
        setattr(stats, key, np.frombuffer(value, np.float64).reshape(shapes[key]).copy())
    # The Gram's constant corner sums a 1 per counted example: the stored rows, or in a
    # multi-label store its items (copies of an input count once).
    stats.n_examples = int(np.rint(stats.gram[-1, -1]))
    matrix = np.vstack(vectors) if vectors else np.zeros((0, dim), np.float32)
    return stats, labels, matrix


def read_vectors(
    conn: sqlite3.Connection, path: Path, dim: int, n: int, *, check: bool = True
) -> np.ndarray:
    """The first ``n`` rows of ``examples.f32``, ``(n, dim)``; with ``check``, checked against
    the checksums of their blocks (each block once per process while the file is unchanged)."""
    file = path / VECTORS
    data = bytearray(n * 4 * dim)
    with open(file, "rb") as f:
        stat = os.fstat(f.fileno())  # before the read: a later change is checked again
        available = f.readinto(data) // (4 * dim)
    if available < n:
        raise StoreCorruptError(
            f"{file}: holds {available} vectors but {n} examples were committed (file damaged)"
        )
    if check:
        blocks = _blocks_of(file, sealed_rows(conn, path, "blocks"), n)
        check_blocks(file, dim, blocks, (stat, memoryview(data)))
    return np.frombuffer(data, dtype=np.float32).reshape(n, dim)


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


def row_labels(conn: sqlite3.Connection) -> list[list[str]]:
    """Labels of every stored example, by row."""
    return [json.loads(v) for (v,) in conn.execute("SELECT labels FROM examples ORDER BY row")]


def examples(
    conn: sqlite3.Connection, rows: Sequence[int], images: dict[str, Image]
) -> list[Example]:
    """Stored examples by row number, in the order asked; ``images`` caches decoded images."""
    found: dict[int, Example] = {}
    image = "image" if has_images(conn) else "NULL"
    for start in range(0, len(rows), _CHUNK):
        chunk = [int(r) for r in rows[start : start + _CHUNK]]
        marks = ",".join("?" * len(chunk))
        query = f"SELECT row, id, text, labels, {image} FROM examples WHERE row IN ({marks})"
        for row, id_, text, labels, key in conn.execute(query, chunk):
            found[row] = Example(id_, text, json.loads(labels), image=_image(conn, key, images))
    return [found[int(r)] for r in rows]


def _image(conn: sqlite3.Connection, key: str | None, images: dict[str, Image]) -> Image | None:
    if key is None:
        return None
    if key not in images:
        row = conn.execute("SELECT data, source FROM images WHERE key = ?", (key,))
        data, source = row.fetchone()
        images[key] = Image.from_bytes(data, source)
    return images[key]


def input_keys(conn: sqlite3.Connection) -> list[str]:
    """Per row, what identifies its input: the image key, or the text."""
    column = "COALESCE(image, text)" if has_images(conn) else "text"
    return [v for (v,) in conn.execute(f"SELECT {column} FROM examples ORDER BY row")]


def existing_ids(conn: sqlite3.Connection, ids: Sequence[str]) -> list[str]:
    """Which of ``ids`` are already stored."""
    hits: list[str] = []
    for start in range(0, len(ids), _CHUNK):
        chunk = list(ids[start : start + _CHUNK])
        marks = ",".join("?" * len(chunk))
        query = f"SELECT id FROM examples WHERE id IN ({marks})"
        hits.extend(r[0] for r in conn.execute(query, chunk))
    return hits
