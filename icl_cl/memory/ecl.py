"""The external continual learner (ECL): statistics + scorers + example index + store."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.config import AUTO_SCORER, SCORERS, MemoryConfig
from icl_cl.errors import ConfigError, DataError
from icl_cl.memory.example_index import ExampleIndex
from icl_cl.memory.scorers import Scorer, build_scorer, top_k
from icl_cl.memory.store import SessionRecord, Store
from icl_cl.types import Example, Label

logger = logging.getLogger(__name__)


class ExternalContinualLearner:
    """Learns sessions of embedded examples by adding to running statistics; never retrains.

    Args:
        store: An open :class:`Store`.
        config: Scorer choice and hyper-parameters (query-time settings; may differ per open).
    """

    def __init__(self, store: Store, config: MemoryConfig) -> None:
        self.store = store
        self.config = config
        self.stats, self._labels, label_vectors = store.load_statistics()
        # Kept as chunks so that a session appends without copying all label vectors.
        self._label_vector_chunks: list[np.ndarray] = [label_vectors]
        self.index = ExampleIndex(store.dim, config.exact_search_max)
        self.index.add(store.load_vectors())
        self._row_labels: list[np.ndarray] | None = None
        self._row_cardinality: np.ndarray | None = None
        self._scorers: dict[str, Scorer] = {}
        self._label_index: ExampleIndex | None = None
        self.multi_label: bool | None = store.meta("multi_label")

    # ---- introspection ---------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def labels(self) -> list[Label]:
        """Known labels in column order."""
        return list(self._labels)

    @property
    def label_vectors(self) -> np.ndarray:
        """Embeddings of the label texts (name and description), in column order."""
        if len(self._label_vector_chunks) > 1:
            self._label_vector_chunks = [np.vstack(self._label_vector_chunks)]
        return self._label_vector_chunks[0]

    @property
    def n_examples(self) -> int:
        return self.stats.n_examples

    def sessions(self) -> list[SessionRecord]:
        return self.store.sessions()

    def label(self, name: str) -> Label | None:
        col = self.stats.col.get(name)
        return None if col is None else self._labels[col]

    # ---- learning --------------------------------------------------------------------------

    def learn(
        self,
        examples: Sequence[Example],
        vectors: np.ndarray,
        new_labels: Sequence[Label],
        new_label_vectors: np.ndarray,
        *,
        multi_label: bool | None,
        seconds: float = 0.0,
    ) -> int:
        """Add one session. Inputs must already be validated; returns the session number.

        The store commits first; memory changes only after the commit succeeded.
        """
        known = self.stats.col
        given = {lab.label: i for i, lab in enumerate(new_labels)}
        missing = {
            lab for ex in examples for lab in ex.labels if lab not in known and lab not in given
        }
        if missing:
            raise DataError(f"labels without a Label entry: {sorted(missing)[:5]}")
        delta = self.stats.delta(vectors, [ex.labels for ex in examples])
        # New columns: labels in order of first use (as the delta numbers them), then labels that
        # were declared but have no example yet.
        used = set(delta.new_labels)
        order = [given[n] for n in delta.new_labels]
        order += [i for i, lab in enumerate(new_labels) if lab.label not in used]
        ordered = [new_labels[i] for i in order]
        ordered_vectors = new_label_vectors[order] if order else new_label_vectors[:0]
        with self.store.writer_lock():
            session = self.store.commit_session(
                examples=examples,
                vectors=vectors,
                new_labels=ordered,
                new_label_vectors=ordered_vectors,
                delta=delta,
                stats=self.stats,
                multi_label=multi_label,
                seconds=seconds,
            )
        # Committed: now (and only now) change memory.
        self.stats.apply(delta)
        for lab in ordered[len(delta.new_labels) :]:
            self.stats.add_label(lab.label)
        self._labels.extend(ordered)
        if ordered:
            self._label_vector_chunks.append(ordered_vectors)
            if self._label_index is not None:  # new labels are retrievable at once
                self._label_index.add(ordered_vectors)
        self.index.add(vectors)
        if self._row_labels is not None and self._row_cardinality is not None:
            col = self.stats.col
            self._row_labels.extend(
                np.array([col[lab] for lab in ex.labels], np.int64) for ex in examples
            )
            self._row_cardinality = np.concatenate(
                [self._row_cardinality, [len(ex.labels) for ex in examples]]
            )
        self._scorers.clear()
        self.multi_label = multi_label
        return session

    # ---- querying --------------------------------------------------------------------------

    def _ensure_rows(self) -> list[np.ndarray]:
        if self._row_labels is None:
            col = self.stats.col
            rows = self.store.row_labels()
            self._row_labels = [np.array([col[lab] for lab in labs], np.int64) for labs in rows]
            self._row_cardinality = np.array([len(labs) for labs in rows], np.float64)
        return self._row_labels

    def resolve_scorer(self, name: str | None = None) -> str:
        """The concrete scorer a name (or the configured default, or ``auto``) stands for."""
        name = name or self.config.scorer
        return AUTO_SCORER[bool(self.multi_label)] if name == "auto" else name

    def scorer(self, name: str | None = None) -> Scorer:
        """The named scorer (default: the configured one), built lazily from current statistics."""
        name = self.resolve_scorer(name)
        if name not in SCORERS:
            raise ConfigError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}")
        if name not in self._scorers:
            rows = self._ensure_rows() if name == "knn" else None
            self._scorers[name] = build_scorer(name, self.stats, self.config, self.index, rows)
        return self._scorers[name]

    def heldout_scorer(self, rows: Sequence[int], name: str | None = None) -> Scorer:
        """A scorer built as if the stored examples at ``rows`` had never been learned.

        Exact for every scorer: their statistics are sums, so the held-out examples' contribution
        is subtracted, and they are excluded from the kNN vote.
        """
        name = self.resolve_scorer(name)
        examples = self.store.examples(list(rows))
        delta = self.stats.delta(self.index.vectors(list(rows)), [ex.labels for ex in examples])
        stats = self.stats.without(delta)
        row_labels = self._ensure_rows() if name == "knn" else None
        return build_scorer(
            name, stats, self.config, self.index, row_labels, frozenset(int(r) for r in rows)
        )

    def ranked(self, scores: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(label, score)`` per row of a score matrix, dropping labels with no example."""
        cols, values = top_k(scores, k)
        labels = self.stats.labels
        return [
            [(labels[c], float(v)) for c, v in zip(row_c, row_v, strict=True) if np.isfinite(v)]
            for row_c, row_v in zip(cols, values, strict=True)
        ]

    def candidates(
        self, queries: np.ndarray, k: int, scorer: str | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top-``k`` labels per query vector, best first, as ``(label, score)``."""
        if k <= 0:
            raise DataError(f"k must be a positive integer, got {k}")
        self.require_examples()
        scores = self.scorer(scorer).scores(np.ascontiguousarray(queries, np.float32))
        return self.ranked(scores, k)

    def score_matrix(self, queries: np.ndarray, scorer: str | None = None) -> np.ndarray:
        """Scores of every label for each query, ``(n, n_labels)`` in column order."""
        self.require_examples()
        return self.scorer(scorer).scores(np.ascontiguousarray(queries, np.float32))

    def retrieve_labels(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels whose text (name and description) is nearest to each query vector:
        ``(cosines, label columns)``; missing slots have column -1. Labels need no examples.

        The index over label vectors is built on first use from the stored vectors (no label is
        embedded again) and grows with every session; it is exact up to
        ``label_exact_search_max`` labels, HNSW above.
        """
        if not self._labels:
            raise DataError(f"{self.store.path}: the store has no labels yet")
        if self._label_index is None:
            self._label_index = ExampleIndex(self.dim, self.config.label_exact_search_max)
            self._label_index.add(self.label_vectors)
        return self._label_index.search(queries, n)

    def label_prior(self) -> np.ndarray:
        """Share of stored examples that carry each label, in column order."""
        return self.stats.counts / max(self.stats.n_examples, 1)

    def neighbours(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest stored examples: ``(similarities, rows)``."""
        self.require_examples()
        return self.index.search(queries, n)

    def expected_cardinality(self, queries: np.ndarray, n: int = 10) -> np.ndarray:
        """Similarity-weighted mean label count of each query's nearest stored examples."""
        sims, rows = self.neighbours(queries, n)
        self._ensure_rows()
        assert self._row_cardinality is not None
        weights = np.clip(sims, 1e-6, None) * (rows >= 0)
        card = self._row_cardinality[np.clip(rows, 0, None)]
        return (weights * card).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-12)

    def demonstrations(
        self, query: np.ndarray, labels: Sequence[str] | None, n: int, pool: int = 200
    ) -> list[Example]:
        """Up to ``n`` stored examples nearest to ``query`` (KATE), restricted to ``labels`` if given."""
        if n <= 0 or self.index.size == 0:
            return []
        _sims, rows = self.neighbours(query[None, :], max(n, pool) if labels else n)
        wanted = None if labels is None else set(labels)
        chosen: list[int] = []
        row_labels = self._ensure_rows() if wanted is not None else None
        names = self.stats.labels
        for row in rows[0]:
            if row < 0:
                continue
            if row_labels is not None and not wanted & {names[c] for c in row_labels[row]}:  # type: ignore[operator]
                continue
            chosen.append(int(row))
            if len(chosen) == n:
                break
        return self.store.examples(chosen)

    def require_examples(self) -> None:
        if self.stats.n_examples == 0:
            raise DataError(f"{self.store.path}: the store is empty; learn a session first")

    def info(self) -> dict[str, Any]:
        return {
            "path": str(Path(self.store.path)),
            "labels": len(self._labels),
            "examples": self.stats.n_examples,
            "dim": self.dim,
            "index": self.index.kind,
            "multi_label": self.multi_label,
        }
