"""Stored rows grouped into items.

In a multi-label store the same input can be learned in several sessions, each time with that
session's labels (class-incremental tagging shows only the session's labels). Its copies are one
item whose labels are the union of theirs: it votes once, with all of them, in the kNN vote, and
its label count is the union's in the label-set size estimate. Copies are recognised by their
input (the text, or the image's key). In a single-label store every row is its own item.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


class ItemGroups:
    """Row -> item, and each item's label columns (the union over its rows)."""

    def __init__(self) -> None:
        self._row_item = np.zeros(0, dtype=np.int64)
        self.labels: list[np.ndarray] = []
        self._by_input: dict[bytes, int] = {}
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
            digest = None if key is None else hashlib.blake2b(key.encode(), digest_size=16).digest()
            item = None if digest is None else self._by_input.get(digest)
            if item is None:
                item = len(self.labels)
                self.labels.append(np.asarray(cols, dtype=np.int64))
                self._copies.append(1)
                if digest is not None:
                    self._by_input[digest] = item
            else:
                self.labels[item] = np.union1d(self.labels[item], cols)
                self._copies[item] += 1
                self.max_copies = max(self.max_copies, self._copies[item])
            items[i] = item
        self._row_item = np.concatenate([self._row_item, items])

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
