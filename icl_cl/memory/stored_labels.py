"""The store's labels as the ECL holds them: definitions in column order, the embedded vectors
of their texts (name and description), and the index that retrieves labels by those vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from icl_cl.memory.example_index import LABELS_FILE, ExampleIndex
from icl_cl.types import Label


class StoredLabels:
    """Label definitions and text vectors, grown by each session.

    Args:
        labels: Definitions in column order.
        vectors: Their text vectors, ``(len(labels), dim)``.
        folder: The store's folder (where a large label index is saved).
        exact_max: Labels up to which the index is exact (HNSW above, saved by each session).
    """

    def __init__(self, labels: list[Label], vectors: np.ndarray, folder: Path, exact_max: int):
        self._labels = labels
        # Kept as chunks so that a session appends without copying all label vectors.
        self._chunks: list[np.ndarray] = [vectors]
        self._folder, self._exact_max = folder, exact_max
        self._index: ExampleIndex | None = None

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, col: int) -> Label:
        return self._labels[col]

    @property
    def definitions(self) -> list[Label]:
        return list(self._labels)

    @property
    def vectors(self) -> np.ndarray:
        """Embeddings of the label texts, in column order."""
        if len(self._chunks) > 1:
            self._chunks = [np.vstack(self._chunks)]
        return self._chunks[0]

    def described(self) -> np.ndarray:
        """Per column, whether the label has a description."""
        return np.array([bool(label.description) for label in self._labels])

    def add(self, labels: list[Label], vectors: np.ndarray) -> None:
        """A committed session's new labels: retrievable at once; a large index is saved (a cache
        of the committed vectors) so that an open reads it."""
        self._labels.extend(labels)
        if labels:
            self._chunks.append(vectors)
            if self._index is not None:
                self._index.add(vectors)
        if len(self._labels) > self._exact_max:
            self.index().save(self._folder / LABELS_FILE)

    def index(self) -> ExampleIndex:
        """The index over label vectors, built on first use from the stored vectors (no label is
        embedded again)."""
        if self._index is None:
            dim = self.vectors.shape[1]
            path = self._folder / LABELS_FILE
            self._index = ExampleIndex.restore(path, dim, self._exact_max, self.vectors)
        return self._index
