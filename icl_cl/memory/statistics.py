"""Running label statistics: the whole state the ECL scorers are computed from.

Everything here is a sum over examples, so learning sessions one after another gives the same
state (to float rounding) as learning their union at once, and a new session only adds to it.
Statistics are float64; vectors given to the index stay float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
        weighted_gram: ``sum m_x x x^T`` with ``m_x`` the number of labels of ``x``, ``(dim, dim)``;
            ``None`` for statistics kept without it.
        n_examples: Examples added: items, in a multi-label store (a copy of a stored input
            adds none).
    """

    new_labels: tuple[str, ...]
    cols: np.ndarray
    counts: np.ndarray
    sums: np.ndarray
    gram: np.ndarray
    weighted_gram: np.ndarray | None
    n_examples: int


# Rows per block when statistics are computed through a feature map.
_BLOCK = 2048


def _add_segment_sums(
    sums: np.ndarray, x: np.ndarray, rows: np.ndarray, groups: np.ndarray
) -> None:
    """``sums[g] += x[r]`` for every pair ``(r, g)`` (segment sums over rows sorted by group;
    np.add.at is an order of magnitude slower)."""
    if len(rows) == 0:
        return
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, np.diff(sorted_groups) != 0])
    sums[sorted_groups[starts]] += np.add.reduceat(x[rows[order]], starts, axis=0)


def _add_grams(
    gram: np.ndarray,
    weighted: np.ndarray | None,
    x: np.ndarray,
    counted: np.ndarray,
    multiplicity: np.ndarray,
) -> None:
    """Add a block of rows to the Gram of ``[x, 1]`` (its counted rows; the last row is filled
    in at the end: one (d x d) product instead of (d+1) x (d+1)) and to the weighted Gram."""
    xc = x if counted.all() else x[counted]
    gram[:-1, :-1] += xc.T @ xc
    gram[:-1, -1] += xc.sum(axis=0)
    if weighted is not None:
        weighted += (x * multiplicity[:, None]).T @ x


def augment(vectors: np.ndarray) -> np.ndarray:
    """Append a constant 1 to each vector (the ridge bias term), in float64."""
    return np.hstack([vectors.astype(np.float64), np.ones((len(vectors), 1))])


class RunningStatistics:
    """Per-label counts and sums, plus the two Gram matrices, with amortised O(1) label growth.

    ``gram=False`` keeps counts and sums only: a random feature space keeps the inverse of its
    Gram instead (:class:`~icl_cl.memory.inverse_gram.InverseGram`), not ``M x M`` sums twice.
    """

    def __init__(self, dim: int, weighted: bool = True, gram: bool = True) -> None:
        self.dim = dim
        self.weighted = weighted and gram
        self.has_gram = gram
        self.labels: list[str] = []
        self.col: dict[str, int] = {}
        self._counts = np.zeros(16, dtype=np.int64)
        self._sums = np.zeros((16, dim), dtype=np.float64)
        self.gram = np.zeros((dim + 1, dim + 1) if gram else (0, 0), dtype=np.float64)
        # Only the Mahalanobis scorer needs it.
        self.weighted_gram: np.ndarray | None = (
            np.zeros((dim, dim), dtype=np.float64) if self.weighted else None
        )
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

    def delta(
        self,
        vectors: np.ndarray,
        label_lists: Sequence[Sequence[str]],
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        counted: np.ndarray | None = None,
    ) -> StatisticsDelta:
        """Compute what learning ``vectors`` with ``label_lists`` adds, without changing ``self``.

        ``transform`` maps a block of vectors to the space these statistics live in (a random
        feature map); it is applied block by block, so the features of a large session are never
        held in memory at once. ``counted`` (default: all) marks the rows that are examples with
        a Gram term; others (copies of a learned item) add only their labels' sums.
        """
        if vectors.ndim != 2:
            raise ValueError(f"expected a matrix of vectors, got shape {vectors.shape}")
        # New labels in order of first use.
        new_labels = list(
            dict.fromkeys(lab for labels in label_lists for lab in labels if lab not in self.col)
        )
        col_of = self.col | {label: len(self.labels) + i for i, label in enumerate(new_labels)}
        rows = np.asarray([i for i, labels in enumerate(label_lists) for _ in labels], np.int64)
        cols = [col_of[label] for labels in label_lists for label in labels]
        touched, local = np.unique(np.asarray(cols, dtype=np.int64), return_inverse=True)
        multiplicity = np.asarray([len(labels) for labels in label_lists], dtype=np.float64)
        counts_once = np.ones(len(vectors), bool) if counted is None else np.asarray(counted, bool)
        single = bool(np.all(multiplicity == 1) and counts_once.all())
        dim = self.dim
        sums = np.zeros((len(touched), dim))
        gram = np.zeros((dim + 1, dim + 1) if self.has_gram else (0, 0))
        weighted = np.zeros((dim, dim)) if self.weighted and not single else None
        block = len(vectors) if transform is None else _BLOCK
        for lo in range(0, len(vectors), max(block, 1)):
            hi = min(lo + block, len(vectors))
            x = vectors[lo:hi] if transform is None else transform(vectors[lo:hi])
            x64 = np.asarray(x, dtype=np.float64)
            if x64.shape[1] != dim:
                raise ValueError(f"expected vectors of dimension {dim}, got {x64.shape[1]}")
            in_block = (rows >= lo) & (rows < hi)
            _add_segment_sums(sums, x64, rows[in_block] - lo, local[in_block])
            if self.has_gram:
                _add_grams(gram, weighted, x64, counts_once[lo:hi], multiplicity[lo:hi])
        n_counted = int(counts_once.sum())
        if self.has_gram:
            gram[-1, :-1], gram[-1, -1] = gram[:-1, -1], n_counted
        if self.weighted and weighted is None:
            weighted = gram[:-1, :-1].copy()  # single-label: every example counts once
        counts = np.bincount(local, minlength=len(touched)).astype(np.int64)
        return StatisticsDelta(
            new_labels=tuple(new_labels),
            cols=touched,
            counts=counts,
            sums=sums,
            gram=gram,
            weighted_gram=weighted,
            n_examples=n_counted,
        )

    def apply(self, delta: StatisticsDelta) -> None:
        """Add a session's delta (call after the store committed it)."""
        for label in delta.new_labels:
            self.add_label(label)
        self._counts[delta.cols] += delta.counts
        self._sums[delta.cols] += delta.sums
        self.gram += delta.gram
        if self.weighted_gram is not None and delta.weighted_gram is not None:
            self.weighted_gram += delta.weighted_gram
        self.n_examples += delta.n_examples

    def without(self, delta: StatisticsDelta) -> RunningStatistics:
        """A copy with ``delta`` subtracted: exactly the statistics had those examples never been
        learned (used to hold stored examples out when fitting fusion weights)."""
        if delta.new_labels:
            raise ValueError("a held-out delta cannot introduce labels")
        out = RunningStatistics(self.dim, weighted=self.weighted, gram=self.has_gram)
        out.labels = list(self.labels)
        out.col = dict(self.col)
        out._counts = self._counts.copy()
        out._sums = self._sums.copy()
        out._counts[delta.cols] -= delta.counts
        out._sums[delta.cols] -= delta.sums
        out.gram = self.gram - delta.gram
        if self.weighted_gram is not None and delta.weighted_gram is not None:
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
