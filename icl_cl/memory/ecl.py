"""The external continual learner (ECL): statistics + scorers + example index + store."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.config import AUTO_SCORER, SCORERS, MemoryConfig
from icl_cl.errors import ConfigError, DataError
from icl_cl.memory.example_index import EXAMPLES_FILE, ExampleIndex
from icl_cl.memory.feature_space import FeatureSpace, SpaceDelta
from icl_cl.memory.item_groups import ItemGroups
from icl_cl.memory.partial import SpaceSums
from icl_cl.memory.scorer_choice import (
    CHOICE_KEY,
    SEPARATOR,
    Combination,
    ScorerChoice,
    combination_parts,
    weights_of,
)
from icl_cl.memory.scorers import (
    FEATURE_SCORERS,
    Scorer,
    build_scorer,
    rank_in_blocks,
    ranked_labels,
)
from icl_cl.memory.statistics import RunningStatistics, StatisticsDelta
from icl_cl.memory.store import ITEM_STATISTICS, SessionRecord, Store
from icl_cl.memory.store_feature_spaces import MAX_LABELS, FeatureSpaces
from icl_cl.memory.stored_items import (
    HeldOutRows,
    group_rows,
    held_out,
    input_of,
    nearest_rows,
    recompute,
    session_additions,
)
from icl_cl.memory.stored_labels import StoredLabels
from icl_cl.types import Example, Label

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Session:
    """A session worked out before its commit: what the store writes, then memory applies."""

    base: RunningStatistics  # the statistics it adds to (recomputed when the store regroups)
    delta: StatisticsDelta
    regrouped: bool  # the store changes kind (single- to multi-label, or back)
    space_deltas: dict[str, SpaceDelta]  # per feature space that keeps its width
    labels: list[Label]  # the new label columns, in order
    label_vectors: np.ndarray
    late_labels: list[str]  # declared labels with no example yet (the last new columns)


class ExternalContinualLearner:
    """Learns sessions of embedded examples by adding to running statistics; never retrains.

    Args:
        store: An open :class:`Store`.
        config: Scorer choice and hyper-parameters (query-time settings; may differ per open).
    """

    def __init__(self, store: Store, config: MemoryConfig) -> None:
        self.store = store
        self.config = config
        self.stats, labels, label_vectors = store.load_statistics()
        self.label_set = StoredLabels(
            labels, label_vectors, self._path, config.label_exact_search_max
        )
        self.index = ExampleIndex.restore(
            self._path / EXAMPLES_FILE, store.dim, config.exact_search_max, store.load_vectors()
        )
        self._items: ItemGroups | None = None
        self._scorers: dict[str, Scorer] = {}
        self._choice: ScorerChoice | None = self._load_choice()
        # Random-feature state of the scorers that need it, loaded on first use.
        self.spaces = FeatureSpaces(store, self.index, config, lambda: self._choice)
        self.multi_label: bool | None = store.meta("multi_label")
        # A multi-label store written before its statistics counted items (each row counted
        # apart): recomputed from the stored vectors here, rewritten in full by the next session.
        self._rewrite = False
        if self.multi_label and store.meta(ITEM_STATISTICS) is None and self.n_examples:
            logger.warning(
                "%s: statistics written by an earlier version count each copy of an input; "
                "recomputed from the stored vectors (the next session stores them)",
                store.path,
            )
            self.stats = recompute(store, self.index.vectors_all(), self.stats.labels, True)
            self._rewrite = True

    # ---- introspection ---------------------------------------------------------------------

    @property
    def _path(self) -> Path:
        return Path(self.store.path)

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
        plan = self._plan(
            examples, vectors, new_labels, new_label_vectors, multi_label, delta, space_sums
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

    def _plan(
        self,
        examples: Sequence[Example],
        vectors: np.ndarray,
        new_labels: Sequence[Label],
        new_label_vectors: np.ndarray,
        multi_label: bool | None,
        delta: StatisticsDelta | None,
        space_sums: SpaceSums | None = None,
    ) -> _Session:
        """Work a session out without changing anything (see :meth:`learn`)."""
        known = self.stats.col
        given = {lab.label: i for i, lab in enumerate(new_labels)}
        missing = {
            lab for ex in examples for lab in ex.labels if lab not in known and lab not in given
        }
        if missing:
            raise DataError(f"labels without a Label entry: {sorted(missing)[:5]}")
        # A store that changes kind (single- to multi-label, or back) groups its stored rows
        # anew: their statistics are recomputed, and rewritten in full with this session.
        switched = self.n_examples > 0 and bool(multi_label) != bool(self.multi_label)
        base, groups = self.stats, self.items() if multi_label else None
        if switched:
            base = recompute(self.store, self.index.vectors_all(), base.labels, bool(multi_label))
            groups = (
                group_rows(self.store, self.n_examples, base.col, True) if multi_label else None
            )
        added = session_additions(groups, examples, vectors, base.col, self.index)
        if delta is not None and delta.n_examples != len(examples):
            raise ValueError(f"delta of {delta.n_examples} examples for {len(examples)} examples")
        # Partial sums of shards count every row: kept only where no row is a copy.
        summed = delta is not None and added.trivial and not switched
        delta = delta if summed else added.delta(base)
        space_deltas = self.spaces.session_deltas(
            added,
            n_items=base.n_examples + delta.n_examples,
            n_rows=self.n_examples,
            labels=base.labels,
            multi_label=multi_label,
            regrouped=switched,
            sums=space_sums if summed else None,
        )
        # New columns: labels in order of first use (as the delta numbers them), then labels that
        # were declared but have no example yet.
        used = set(delta.new_labels)
        order = [given[n] for n in delta.new_labels]
        order += [i for i, lab in enumerate(new_labels) if lab.label not in used]
        ordered = [new_labels[i] for i in order]
        ordered_vectors = new_label_vectors[order] if order else new_label_vectors[:0]
        late = [lab.label for lab in ordered[len(delta.new_labels) :]]
        return _Session(base, delta, switched, space_deltas, ordered, ordered_vectors, late)

    def _apply(
        self,
        plan: _Session,
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
        self.index.save(self._path / EXAMPLES_FILE)
        if self._items is not None and multi_label == self.multi_label and not plan.regrouped:
            self._add_items([input_of(ex) for ex in examples], [ex.labels for ex in examples])
        else:
            self._items = None  # built again on use (copies are grouped in multi-label stores)
        self._scorers.clear()
        self.multi_label = multi_label

    # ---- querying --------------------------------------------------------------------------

    def items(self) -> ItemGroups:
        """Stored rows grouped into items, with each item's labels."""
        if self._items is None:
            self._items = group_rows(
                self.store, self.n_examples, self.stats.col, bool(self.multi_label)
            )
        return self._items

    def _add_items(self, inputs: Sequence[str], labels: Sequence[Sequence[str]]) -> None:
        assert self._items is not None
        col = self.stats.col
        keys = inputs if self.multi_label else [None] * len(inputs)
        self._items.add(keys, [np.array([col[lab] for lab in labs], np.int64) for labs in labels])

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
        if save:
            self.store.save_fitted(CHOICE_KEY, choice.to_dict(), choice.n_examples)
        self._choice = choice
        # The loaded feature spaces take the new strengths (those on disk when they are loaded);
        # a saved choice keeps the state of only the feature scorers it uses.
        if save:
            self.spaces.keep_only(combination_parts(choice.scorer))
        self.spaces.restrengthen()
        if save:
            self.spaces.persist()
        self._scorers.clear()

    def _load_choice(self) -> ScorerChoice | None:
        stored = self.store.fitted(CHOICE_KEY)
        return ScorerChoice.from_dict(stored[0]) if stored is not None else None

    def refresh_strengths(self, name: str | None = None, *, full: bool = False) -> None:
        """Set the strengths of the feature scorers scorer ``name`` uses again once the store
        has doubled since they were set, or with ``full`` (a fit step)."""
        parts = combination_parts(self.resolve_scorer(name))
        self.spaces.refresh_strengths(parts, full=full, **self._space_args())
        self._scorers.clear()

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
        if name not in self._scorers:
            if SEPARATOR in name:
                weights = weights_of(self._choice, name)
                parts = [(self.scorer(part), w) for part, w in weights.items()]
                self._scorers[name] = Combination(parts, self._novelty())
            elif name in FEATURE_SCORERS:
                self._scorers[name] = self.spaces.scorer(name, **self._space_args())
            else:
                self._scorers[name] = self._build(name, self.stats)
        return self._scorers[name]

    def _build(
        self, name: str, stats: RunningStatistics, excluded: frozenset[int] = frozenset()
    ) -> Scorer:
        items = self.items() if name == "knn" else None
        if name not in ("description", "ncm"):
            return build_scorer(name, stats, self.config, self.index, items, excluded)
        texts = {"label_vectors": self.label_vectors, "described": self.label_set.described()}
        return build_scorer(name, stats, self.config, self.index, items, excluded, **texts)

    def _space_args(self) -> dict[str, Any]:
        return {
            "n_items": self.n_items,
            "n_rows": self.n_examples,
            "labels": self.stats.labels,
            "multi_label": self.multi_label,
        }

    def feature_space(self, name: str) -> FeatureSpace:
        """The learner state a feature scorer (``ranpac``, ``klda``) is solved from (see
        :class:`~icl_cl.memory.store_feature_spaces.FeatureSpaces`)."""
        return self.spaces.space(name, **self._space_args())

    def heldout_items(self, rows: Sequence[int]) -> HeldOutRows:
        """The stored items at ``rows`` as the statistics count them (see :func:`held_out`)."""
        groups = self.items() if self.multi_label else None
        return held_out(groups, self.store, self.index, self.stats.labels, rows)

    def heldout_scorer(self, rows: Sequence[int], name: str | None = None) -> Scorer:
        """A scorer built as if the stored items at ``rows`` had never been learned.

        Exact for every scorer: their statistics are sums, so the held-out items' contribution
        is subtracted (each once: :meth:`heldout_items`), and they are excluded from the kNN
        vote.
        """
        name = self.resolve_scorer(name)
        if SEPARATOR in name:
            weights = weights_of(self._choice, name)
            parts = [(self.heldout_scorer(rows, p), w) for p, w in weights.items()]
            return Combination(parts, self._novelty())
        held = self.heldout_items(rows)
        if name in FEATURE_SCORERS:
            return self.spaces.heldout_scorer(name, held.vectors, held.labels, **self._space_args())
        stats = self.stats.without(self.stats.delta(held.vectors, held.labels))
        return self._build(name, stats, frozenset(held.rows))

    def _novelty(self) -> float:
        """The stored choice's standing of labels with no example (see :class:`Combination`)."""
        return (self._choice.novelty if self._choice is not None else None) or 0.0

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
