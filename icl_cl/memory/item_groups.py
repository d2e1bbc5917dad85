"""Stored rows grouped into items, and what new rows add to the items' statistics.

In a multi-label store the same input can be learned in several sessions, each time with that
session's labels (class-incremental tagging shows only the session's labels). Its copies are one
item whose labels are the union of theirs: it votes once, with all of them, in the kNN vote, its
label count is the union's in the label-set size estimate, and it counts once in the statistics
(one Gram term, one example, one count and sum per label, with its first copy's vector). So a
store learned facet by facet has the statistics of the store learned once with the union of the
labels. Copies are recognised by their input (the text, or the image's key) up to case, Unicode
form and spacing (:func:`input_key`). In a single-label store every row is its own item.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from icl_cl.memory.statistics import RunningStatistics, StatisticsDelta

# Stored rows added to recomputed statistics at a time (bounds their float64 copies).
_CHUNK = 20_000


def input_key(text: str) -> str:
    """What makes two stored inputs copies: their text (or image key) with case, Unicode form
    and runs of white space made alike, as a digest."""
    normal = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return hashlib.sha256(normal.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Additions:
    """What a batch of rows adds to the items' statistics: only the rows that add anything.

    Attributes:
        vectors: Per kept row, its item's vector (that of the item's first copy).
        labels: Per kept row, the labels its item did not hold yet.
        opens: Per kept row, whether it is its item's first copy: then it counts as an example
            and adds the Gram term.
        trivial: Every row of the batch is a new item with all its labels (no copy anywhere):
            the rows add exactly what they add one by one.
    """

    vectors: np.ndarray
    labels: list[list[str]]
    opens: np.ndarray
    trivial: bool

    def delta(
        self,
        stats: RunningStatistics,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> StatisticsDelta:
        """What these additions add to ``stats`` (through ``transform``, in a feature space)."""
        return stats.delta(self.vectors, self.labels, transform=transform, counted=self.opens)


class ItemGroups:
    """Row -> item, and each item's label columns (the union over its rows)."""

    def __init__(self) -> None:
        self._row_item = np.zeros(0, dtype=np.int64)
        self.labels: list[np.ndarray] = []
        self.first_row: list[int] = []
        self._by_input: dict[str, int] = {}
        self._copies: list[int] = []
        self.max_copies = 1

    @property
    def n_rows(self) -> int:
        return len(self._row_item)

    def add(self, inputs: Sequence[str | None], label_cols: Sequence[np.ndarray]) -> None:
        """Append rows: ``inputs[i]`` identifies row i's input, or is ``None`` when the row is
        an item of its own; ``label_cols[i]`` are its label columns."""
        items = np.empty(len(inputs), dtype=np.int64)
        for i, (key, cols) in enumerate(zip(inputs, label_cols, strict=True)):
            digest = None if key is None else input_key(key)
            item = None if digest is None else self._by_input.get(digest)
            if item is None:
                item = len(self.labels)
                self.labels.append(np.unique(np.asarray(cols, dtype=np.int64)))
                self.first_row.append(self.n_rows + i)
                self._copies.append(1)
                if digest is not None:
                    self._by_input[digest] = item
            else:
                self.labels[item] = np.union1d(self.labels[item], cols)
                self._copies[item] += 1
                self.max_copies = max(self.max_copies, self._copies[item])
            items[i] = item
        self._row_item = np.concatenate([self._row_item, items])

    def additions(
        self,
        inputs: Sequence[str | None],
        label_lists: Sequence[Sequence[str]],
        col: Mapping[str, int],
        vectors: np.ndarray,
        stored: Callable[[list[int]], np.ndarray],
    ) -> Additions:
        """What rows appended after the grouped ones add (this grouping is not changed).

        Args:
            inputs: Per new row, its input (``None``: an item of its own).
            label_lists: Per new row, its labels.
            col: Column of every label the grouped rows carry.
            vectors: The new rows' vectors.
            stored: Vectors of grouped rows by row number (an item's first copy).
        """
        n_stored = self.n_rows
        kept: list[int] = []
        sources: list[int] = []
        labels: list[list[str]] = []
        opens: list[bool] = []
        # Items touched by the batch: (row of the first copy, stored label columns, labels added).
        touched: dict[str, tuple[int, set[int], set[str]]] = {}
        for i, (key, labs) in enumerate(zip(inputs, label_lists, strict=True)):
            digest = None if key is None else input_key(key)
            state = None if digest is None else touched.get(digest)
            opened = False
            if state is None:
                item = None if digest is None else self._by_input.get(digest)
                if item is None:
                    state, opened = (n_stored + i, set(), set()), True
                else:
                    state = (self.first_row[item], set(self.labels[item].tolist()), set())
                if digest is not None:
                    touched[digest] = state
            source, held, added = state
            new = [
                lab
                for lab in dict.fromkeys(labs)
                if lab not in added and (lab not in col or col[lab] not in held)
            ]
            added.update(new)
            if opened or new:
                kept.append(i)
                sources.append(source)
                labels.append(new)
                opens.append(opened)
        trivial = (
            len(kept) == len(inputs)
            and all(opens)
            and sum(map(len, labels)) == sum(len(labs) for labs in label_lists)
        )
        return Additions(
            _vectors(sources, n_stored, vectors, stored), labels, np.array(opens, bool), trivial
        )

    def item_of(self, rows: np.ndarray) -> np.ndarray:
        """Item of each row (``-1`` rows, FAISS's empty slots, map to ``-1``)."""
        rows = np.asarray(rows)
        return np.where(rows >= 0, self._row_item[np.clip(rows, 0, None)], -1)

    def labels_of_row(self, row: int) -> np.ndarray:
        return self.labels[int(self._row_item[row])]

    def cardinality_of_items(self, items: np.ndarray) -> np.ndarray:
        """Label count of each item (0 for ``-1``)."""
        counts = np.array([len(labels) for labels in self.labels] + [0], dtype=np.float64)
        return counts[np.where(items >= 0, items, len(self.labels))]

    def mean_cardinality(self, sims: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
        """Similarity-weighted mean label count of the first ``n`` items among each query's
        neighbour ``rows`` (nearest first), an item counted once, at its nearest row."""
        item_of = self.item_of(rows)
        card = self.cardinality_of_items(item_of)
        first = np.zeros_like(rows, dtype=bool)
        for i in range(len(rows)):
            _, at = np.unique(item_of[i], return_index=True)
            at = np.sort(at[item_of[i][at] >= 0])[:n]
            first[i, at] = True
        weights = np.clip(sims, 1e-6, None) * first
        return (weights * card).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-12)

    def rows_of_items(self, items: Sequence[int]) -> list[int]:
        """Every row of the given items, in row order."""
        return np.flatnonzero(np.isin(self._row_item, np.asarray(items, np.int64))).tolist()


def _vectors(
    sources: Sequence[int],
    n_stored: int,
    vectors: np.ndarray,
    stored: Callable[[list[int]], np.ndarray],
) -> np.ndarray:
    """Vectors of rows numbered over the grouped rows then the new ones."""
    at = np.asarray(sources, np.int64)
    out = np.empty((len(at), vectors.shape[1]), dtype=np.float32)
    old = at < n_stored
    if old.any():
        out[old] = stored(at[old].tolist())
    out[~old] = vectors[at[~old] - n_stored]
    return out


def stored_additions(
    vectors: np.ndarray,
    row_labels: Sequence[Sequence[str]],
    inputs: Sequence[str | None],
    col: Mapping[str, int],
    *,
    start: int = 0,
    chunk: int = _CHUNK,
) -> Iterator[tuple[Additions, int]]:
    """What stored rows ``start:`` add to statistics that hold rows ``:start`` already, as
    items (``inputs[i]``: row i's input, ``None`` when every row is its own item), ``chunk``
    rows at a time: each chunk's additions and its row count. ``col`` must name every label."""
    groups = ItemGroups()
    groups.add(inputs[:start], [[col[lab] for lab in labs] for labs in row_labels[:start]])
    for lo in range(start, len(vectors), chunk):
        hi = min(lo + chunk, len(vectors))
        added = groups.additions(
            inputs[lo:hi], row_labels[lo:hi], col, vectors[lo:hi], lambda r: vectors[r]
        )
        yield added, hi - lo
        groups.add(inputs[lo:hi], [[col[lab] for lab in labs] for labs in row_labels[lo:hi]])


def add_rows(
    stats: RunningStatistics,
    vectors: np.ndarray,
    row_labels: Sequence[Sequence[str]],
    inputs: Sequence[str | None],
    *,
    start: int = 0,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> None:
    """Add stored rows ``start:`` to ``stats``, which holds rows ``:start`` already, as items
    (``inputs[i]``: row i's input, ``None`` when every row is its own item)."""
    for added, _rows in stored_additions(vectors, row_labels, inputs, stats.col, start=start):
        stats.apply(added.delta(stats, transform))
