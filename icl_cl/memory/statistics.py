"""Running label statistics: the whole state the ECL scorers are computed from.

Everything here is a sum over examples, so learning sessions one after another gives the same
state (to float rounding) as learning their union at once, and a new session only adds to it.
Statistics are float64; vectors given to the index stay float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StatisticsDelta:
    """What one session adds. Applied to memory only after the store has committed it.

    Attributes:
        new_labels: Labels first seen in this session, in the column order they will get.
        cols: Columns (existing or new) whose count or sum changes.
        counts: Examples added per column in ``cols``.
        sums: Sum of the added vectors per column in ``cols``, shape ``(len(cols), dim)``.
        gram: ``sum x~ x~^T`` of the added vectors augmented with a constant 1, ``(dim+1, dim+1)``.
        weighted_gram: ``sum m_x x x^T`` with ``m_x`` the number of labels of ``x``, ``(dim, dim)``.
        n_examples: Examples added.
    """

    new_labels: tuple[str, ...]
    cols: np.ndarray
    counts: np.ndarray
    sums: np.ndarray
    gram: np.ndarray
    weighted_gram: np.ndarray
    n_examples: int


def augment(vectors: np.ndarray) -> np.ndarray:
    """Append a constant 1 to each vector (the ridge bias term), in float64."""
    return np.hstack([vectors.astype(np.float64), np.ones((len(vectors), 1))])


class RunningStatistics:
    """Per-label counts and sums, plus the two Gram matrices, with amortised O(1) label growth."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.labels: list[str] = []
        self.col: dict[str, int] = {}
        self._counts = np.zeros(16, dtype=np.int64)
        self._sums = np.zeros((16, dim), dtype=np.float64)
        self.gram = np.zeros((dim + 1, dim + 1), dtype=np.float64)
        self.weighted_gram = np.zeros((dim, dim), dtype=np.float64)
        self.n_examples = 0

    @property
    def counts(self) -> np.ndarray:
        """Examples per label, in column order."""
        return self._counts[: len(self.labels)]

    @property
    def sums(self) -> np.ndarray:
        """Sum of example vectors per label, ``(n_labels, dim)``."""
        return self._sums[: len(self.labels)]

    def means(self) -> np.ndarray:
        """Class means; rows of labels with no example are zero."""
        counts = self.counts
        return self.sums / np.maximum(counts, 1)[:, None]

    def delta(self, vectors: np.ndarray, label_lists: Sequence[Sequence[str]]) -> StatisticsDelta:
        """Compute what learning ``vectors`` with ``label_lists`` adds, without changing ``self``."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        new_labels: list[str] = []
        seen_new: set[str] = set()
        for labels in label_lists:
            for label in labels:
                if label not in self.col and label not in seen_new:
                    seen_new.add(label)
                    new_labels.append(label)
        col_of = dict(self.col)
        for offset, label in enumerate(new_labels):
            col_of[label] = len(self.labels) + offset
        rows = [i for i, labels in enumerate(label_lists) for _ in labels]
        cols = [col_of[label] for labels in label_lists for label in labels]
        touched, local = np.unique(np.asarray(cols, dtype=np.int64), return_inverse=True)
        x64 = vectors.astype(np.float64)
        # Segment sums over rows sorted by column (np.add.at is an order of magnitude slower).
        order = np.argsort(local, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(local[order]) != 0])
        if len(order):
            sums = np.add.reduceat(x64[np.asarray(rows, dtype=np.int64)[order]], starts, axis=0)
        else:
            sums = np.zeros((0, self.dim), dtype=np.float64)
        counts = np.bincount(local, minlength=len(touched)).astype(np.int64)
        # Gram of [x, 1] assembled from blocks: one (d x d) product instead of (d+1) x (d+1).
        plain = x64.T @ x64
        gram = np.empty((self.dim + 1, self.dim + 1))
        gram[:-1, :-1] = plain
        gram[:-1, -1] = gram[-1, :-1] = x64.sum(axis=0)
        gram[-1, -1] = len(vectors)
        multiplicity = np.asarray([len(labels) for labels in label_lists], dtype=np.float64)
        if np.all(multiplicity == 1):
            weighted = plain.copy()  # single-label: every example counts once
        else:
            weighted = (x64 * multiplicity[:, None]).T @ x64
        return StatisticsDelta(
            new_labels=tuple(new_labels),
            cols=touched,
            counts=counts,
            sums=sums,
            gram=gram,
            weighted_gram=weighted,
            n_examples=len(vectors),
        )

    def apply(self, delta: StatisticsDelta) -> None:
        """Add a session's delta (call after the store committed it)."""
        for label in delta.new_labels:
            self.add_label(label)
        self._counts[delta.cols] += delta.counts
        self._sums[delta.cols] += delta.sums
        self.gram += delta.gram
        self.weighted_gram += delta.weighted_gram
        self.n_examples += delta.n_examples

    def without(self, delta: StatisticsDelta) -> RunningStatistics:
        """A copy with ``delta`` subtracted: exactly the statistics had those examples never been
        learned (used to hold stored examples out when fitting fusion weights)."""
        if delta.new_labels:
            raise ValueError("a held-out delta cannot introduce labels")
        out = RunningStatistics(self.dim)
        out.labels = list(self.labels)
        out.col = dict(self.col)
        out._counts = self._counts.copy()
        out._sums = self._sums.copy()
        out._counts[delta.cols] -= delta.counts
        out._sums[delta.cols] -= delta.sums
        out.gram = self.gram - delta.gram
        out.weighted_gram = self.weighted_gram - delta.weighted_gram
        out.n_examples = self.n_examples - delta.n_examples
        return out

    def add_label(self, label: str, count: int = 0, total: np.ndarray | None = None) -> int:
        """Append a label column (used when loading a store and when applying a delta)."""
        if label in self.col:
            raise ValueError(f"label {label!r} already has a column")
        c = len(self.labels)
        if c == len(self._counts):
            self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
            self._sums = np.concatenate([self._sums, np.zeros_like(self._sums)])
        self.labels.append(label)
        self.col[label] = c
        self._counts[c] = count
        self._sums[c] = 0.0 if total is None else total
        return c
