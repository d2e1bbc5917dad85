"""The external continual learner (ECL): statistics + scorers + example index + store."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.config import AUTO_SCORER, SCORERS, MemoryConfig
from icl_cl.errors import ConfigError, DataError
from icl_cl.memory.built_scorers import BuiltScorers
from icl_cl.memory.example_index import EXAMPLES_FILE, ExampleIndex
from icl_cl.memory.feature_space import FeatureSpace
from icl_cl.memory.item_groups import ItemGroups
from icl_cl.memory.partial import SpaceSums
from icl_cl.memory.scorer_choice import (
    CHOICE_KEY,
    ScorerChoice,
    combination_parts,
)
from icl_cl.memory.scorers import (
    FEATURE_SCORERS,
    Scorer,
    rank_in_blocks,
    ranked_labels,
)
from icl_cl.memory.session_plan import SessionPlan, plan_session
from icl_cl.memory.statistics import RunningStatistics, StatisticsDelta
from icl_cl.memory.store import ITEM_STATISTICS, SessionRecord, Store
from icl_cl.memory.store_feature_spaces import MAX_LABELS, FeatureSpaces
from icl_cl.memory.stored_items import (
    group_rows,
    input_of,
    nearest_rows,
    recompute,
)
from icl_cl.memory.stored_labels import StoredLabels
from icl_cl.types import Example, Label

logger = logging.getLogger(__name__)


class ExternalContinualLearner:
    """Learns sessions of embedded examples by adding to running statistics; never retrains.

    Open one with :meth:`open`, which loads what a store keeps; the constructor only assembles
    parts already loaded.
    """

    def __init__(
        self,
        store: Store,
        config: MemoryConfig,
        stats: RunningStatistics,
        label_set: StoredLabels,
        index: ExampleIndex,
        *,
        rewrite: bool = False,
    ) -> None:
        self.store = store
        self.config = config  # query-time settings: may differ per open
        self.stats = stats
        self.label_set = label_set
        self.index = index
        self.multi_label: bool | None = store.meta("multi_label")
        self._items: ItemGroups | None = None
        self.scorers = BuiltScorers(self)
        stored = store.fitted(CHOICE_KEY)
        self._choice = ScorerChoice.from_dict(stored[0]) if stored is not None else None
        # Random-feature state of the scorers that need it, loaded on first use.
        self.spaces = FeatureSpaces(store, index, config, lambda: self._choice)
        # Statistics recomputed on open, to be stored in full by the next session.
        self._rewrite = rewrite

    @classmethod
    def open(cls, store: Store, config: MemoryConfig) -> ExternalContinualLearner:
        """The memory of an open :class:`Store`: its statistics, labels and example index."""
        stats, labels, label_vectors = store.load_statistics()
        path = Path(store.path)
        label_set = StoredLabels(labels, label_vectors, path, config.label_exact_search_max)
        index = ExampleIndex.restore(
            path / EXAMPLES_FILE, store.dim, config.exact_search_max, store.load_vectors()
        )
        # A multi-label store written before its statistics counted items (each row counted
        # apart): recomputed from the stored vectors here, rewritten in full by the next session.
        old = store.meta("multi_label") and store.meta(ITEM_STATISTICS) is None and index.size
        if old:
            logger.warning(
                "%s: statistics written by an earlier version count each copy of an input; "
                "recomputed from the stored vectors (the next session stores them)",
                store.path,
            )
            stats = recompute(store, index.vectors_all(), stats.labels, True)
        return cls(store, config, stats, label_set, index, rewrite=bool(old))

    # ---- introspection ---------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def labels(self) -> list[Label]:
        """Known labels in column order."""
        return self.label_set.definitions

    @property
    def label_vectors(self) -> np.ndarray:
        """Embeddings of the label texts (name and description), in column order."""
        return self.label_set.vectors

    @property
    def n_examples(self) -> int:
        """Stored rows this memory loaded (copies of an input included)."""
        return self.index.size

    @property
    def n_items(self) -> int:
        """Examples the statistics count: the stored rows, or in a multi-label store its items
        (copies of an input learned in several sessions count once)."""
        return self.stats.n_examples

    def sessions(self) -> list[SessionRecord]:
        return self.store.sessions()

    def label(self, name: str) -> Label | None:
        col = self.stats.col.get(name)
        return None if col is None else self.label_set[col]

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
        delta: StatisticsDelta | None = None,
        space_sums: SpaceSums | None = None,
    ) -> int:
        """Add one session. Inputs must already be validated; returns the session number.

        ``delta`` is the session's statistics when they were computed elsewhere (merged from
        partial sums of shards); by default they are computed here from ``vectors``. Likewise
        ``space_sums``: per feature scorer, its map and each shard's sums in it (see
        :meth:`~icl_cl.memory.store_feature_spaces.FeatureSpaces.summable`). The store commits first;
        memory changes only after the commit succeeded.
        """
        plan = plan_session(
            self, examples, vectors, new_labels, new_label_vectors, multi_label, delta, space_sums
        )
        with self.store.writer_lock():
            session = self.store.commit_session(
                examples=examples,
                vectors=vectors,
                new_labels=plan.labels,
                new_label_vectors=plan.label_vectors,
                delta=plan.delta,
                stats=plan.base,
                multi_label=multi_label,
                seconds=seconds,
                rewrite=plan.regrouped or self._rewrite,
            )
        self._apply(plan, examples, vectors, multi_label)
        return session

    def _apply(
        self,
        plan: SessionPlan,
        examples: Sequence[Example],
        vectors: np.ndarray,
        multi_label: bool | None,
    ) -> None:
        """Change memory by a committed session."""
        self.stats, self._rewrite = plan.base, False
        self.stats.apply(plan.delta)
        for label in plan.late_labels:
            self.stats.add_label(label)
        self.spaces.apply(plan.space_deltas, len(examples), plan.late_labels)
        self.spaces.persist()
        self.label_set.add(plan.labels, plan.label_vectors)
        self.index.add(vectors)
        # Large indexes are saved (a cache of the committed vectors) so that an open reads them.
        self.index.save(Path(self.store.path) / EXAMPLES_FILE)
        if self._items is not None and multi_label == self.multi_label and not plan.regrouped:
            keys = [input_of(ex) if multi_label else None for ex in examples]
            col = self.stats.col
            self._items.add(
                keys, [np.array([col[n] for n in ex.labels], np.int64) for ex in examples]
            )
        else:
            self._items = None  # built again on use (copies are grouped in multi-label stores)
        self.scorers.clear()
        self.multi_label = multi_label

    # ---- querying --------------------------------------------------------------------------

    def items(self) -> ItemGroups:
        """Stored rows grouped into items, with each item's labels."""
        if self._items is None:
            self._items = group_rows(
                self.store, self.n_examples, self.stats.col, bool(self.multi_label)
            )
        return self._items

    def resolve_scorer(self, name: str | None = None) -> str:
        """The concrete scorer a name (or the configured default) stands for: ``auto`` is what
        the last fit chose on held-out stored examples (:attr:`choice`), or before any fit the
        scorer that measured best on the development corpora."""
        name = name or self.config.scorer
        if name != "auto":
            return name
        if self._choice is not None:
            return self._choice.scorer
        default = AUTO_SCORER[bool(self.multi_label)]
        if default in FEATURE_SCORERS and len(self.label_set) > MAX_LABELS:
            return "mahalanobis"  # too many labels for a feature space's per-label state
        return default

    @property
    def choice(self) -> ScorerChoice | None:
        """The stored choice of ``auto`` and of ranpac's ridge strength (``None`` before a fit)."""
        return self._choice

    def set_choice(self, choice: ScorerChoice, *, save: bool) -> None:
        """Use ``choice`` from now on; with ``save``, store it (a fit does, a prediction never)."""
        if save:  # a saved choice keeps the state of only the feature scorers it uses
            self.store.save_fitted(CHOICE_KEY, choice.to_dict(), choice.n_examples)
            self.spaces.keep_only(combination_parts(choice.scorer))
        self._choice = choice
        self.spaces.restrengthen()  # the loaded spaces take the new strengths
        if save:
            self.spaces.persist()
        self.scorers.clear()

    def refresh_strengths(self, name: str | None = None, *, full: bool = False) -> None:
        """Set the strengths of the feature scorers scorer ``name`` uses again once the store
        has doubled since they were set, or with ``full`` (a fit step)."""
        parts = combination_parts(self.resolve_scorer(name))
        self.spaces.refresh_strengths(parts, full=full, **self.space_args())
        self.scorers.clear()

    def save_derived(self) -> None:
        """Save the feature spaces' state and solved weights (a writing step: learn, fit)."""
        self.spaces.persist()

    def scorer(self, name: str | None = None) -> Scorer:
        """The named scorer (default: the configured one), built lazily from current statistics;
        a combination (``klda+knn``) weighs its scorers as the stored choice says."""
        name = self.resolve_scorer(name)
        unknown = [part for part in combination_parts(name) if part not in SCORERS]
        if unknown:
            raise ConfigError(f"unknown scorer {unknown[0]!r}; choose one of {', '.join(SCORERS)}")
        return self.scorers.get(name)

    def space_args(self) -> dict[str, Any]:
        """What a feature space is solved against: the counts, label columns and kind of store."""
        return {
            "n_items": self.n_items,
            "n_rows": self.n_examples,
            "labels": self.stats.labels,
            "multi_label": self.multi_label,
        }

    def feature_space(self, name: str) -> FeatureSpace:
        """The learner state a feature scorer (``ranpac``, ``klda``) is solved from (see
        :class:`~icl_cl.memory.store_feature_spaces.FeatureSpaces`)."""
        return self.spaces.space(name, **self.space_args())

    def heldout_scorer(self, rows: Sequence[int], name: str | None = None) -> Scorer:
        """A scorer built as if the stored items at ``rows`` had never been learned: exact for
        every scorer (see :meth:`BuiltScorers.held_out`)."""
        return self.scorers.held_out(rows, self.resolve_scorer(name))

    def ranked(self, scores: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(label, score)`` per row of a score matrix, dropping labels with no example."""
        return ranked_labels(scores, self.stats.labels, k)

    def candidates(
        self, queries: np.ndarray, k: int, scorer: str | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top-``k`` labels per query vector, best first, as ``(label, score)``."""
        if k <= 0:
            raise DataError(f"k must be a positive integer, got {k}")
        self.require_examples()
        return rank_in_blocks(self.scorer(scorer), queries, self.stats.labels, k)

    def score_matrix(self, queries: np.ndarray, scorer: str | None = None) -> np.ndarray:
        """Scores of every label for each query, ``(n, n_labels)`` in column order."""
        self.require_examples()
        return self.scorer(scorer).scores(np.ascontiguousarray(queries, np.float32))

    def retrieve_labels(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels whose text (name and description) is nearest to each query vector:
        ``(cosines, label columns)``; missing slots have column -1. Labels need no examples.

        The index over label vectors is built on first use from the stored vectors (no label is
        embedded again) and grows with every session; it is exact up to
        ``label_exact_search_max`` labels, HNSW above (saved by each session, read on open).
        """
        if not len(self.label_set):
            raise DataError(f"{self.store.path}: the store has no labels yet")
        return self.label_set.index().search(queries, n)

    def neighbours(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest stored examples: ``(similarities, rows)``."""
        self.require_examples()
        return self.index.search(queries, n)

    def expected_cardinality(self, queries: np.ndarray, n: int = 10) -> np.ndarray:
        """Similarity-weighted mean label count of each query's ``n`` nearest stored items (an
        item learned in several sessions counts once, with all of its labels)."""
        items = self.items()
        return items.mean_cardinality(*self.neighbours(queries, n * items.max_copies), n)

    def demonstrations(
        self, query: np.ndarray, labels: Sequence[str] | None, n: int, pool: int = 200
    ) -> list[Example]:
        """Up to ``n`` stored examples nearest to ``query`` (KATE), restricted to ``labels`` if given."""
        if n <= 0 or self.index.size == 0:
            return []
        _sims, rows = self.neighbours(query[None, :], max(n, pool) if labels else n)
        items = self.items() if labels is not None else None
        return self.store.examples(nearest_rows(rows[0], items, self.stats.labels, labels, n))

    def require_examples(self) -> None:
        if self.stats.n_examples == 0:
            raise DataError(f"{self.store.path}: the store is empty; learn a session first")

    def info(self) -> dict[str, Any]:
        return {
            "path": str(Path(self.store.path)),
            "labels": len(self.label_set),
            "examples": self.n_examples,
            "items": self.n_items,
            "dim": self.dim,
            "index": self.index.kind,
            "multi_label": self.multi_label,
        }
