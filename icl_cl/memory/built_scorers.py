"""The scorers of one memory, built on first use from its current statistics and kept until a
session, a fit or a new choice changes what they are built from.

A scorer is a pure function of sums over examples, so a scorer "as if some stored items had
never been learned" is built the same way from the statistics less those items: that is how
every held-out score of this project is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from icl_cl.memory.scorer_choice import SEPARATOR, Combination, weights_of
from icl_cl.memory.scorers import FEATURE_SCORERS, Scorer, build_scorer
from icl_cl.memory.statistics import RunningStatistics
from icl_cl.memory.stored_items import HeldOutRows, held_out

if TYPE_CHECKING:
    from icl_cl.memory.ecl import ExternalContinualLearner


class BuiltScorers:
    """A cache of a memory's scorers by (resolved) name; :meth:`clear` when the memory changes."""

    def __init__(self, memory: ExternalContinualLearner) -> None:
        self._memory = memory
        self._built: dict[str, Scorer] = {}

    def clear(self) -> None:
        self._built.clear()

    def get(self, name: str) -> Scorer:
        """Scorer ``name``; a combination (``klda+knn``) weighs its parts as the stored choice
        says."""
        if name not in self._built:
            memory = self._memory
            if SEPARATOR in name:
                weights = weights_of(memory.choice, name)
                parts = [(self.get(part), w) for part, w in weights.items()]
                self._built[name] = Combination(parts, self._novelty())
            elif name in FEATURE_SCORERS:
                self._built[name] = memory.spaces.scorer(name, **memory.space_args())
            else:
                self._built[name] = self._plain(name, memory.stats)
        return self._built[name]

    def held_out(self, rows: Sequence[int], name: str) -> Scorer:
        """Scorer ``name`` as if the stored items at ``rows`` had never been learned (built anew,
        not cached): their contribution is subtracted, each item once, and they are excluded from
        the kNN vote."""
        return self._held_out(self.held_out_rows(rows), name)

    def _held_out(self, held: HeldOutRows, name: str) -> Scorer:
        """:meth:`held_out` of items looked up once for every part of a combination."""
        memory = self._memory
        if SEPARATOR in name:
            weights = weights_of(memory.choice, name)
            parts = [(self._held_out(held, part), w) for part, w in weights.items()]
            return Combination(parts, self._novelty())
        if name in FEATURE_SCORERS:
            args = memory.space_args()
            return memory.spaces.heldout_scorer(name, held.vectors, held.labels, **args)
        stats = memory.stats.without(memory.stats.delta(held.vectors, held.labels))
        return self._plain(name, stats, frozenset(held.rows))

    def held_out_rows(self, rows: Sequence[int]) -> HeldOutRows:
        """The stored items at ``rows`` as the statistics count them (see :func:`held_out`)."""
        memory = self._memory
        groups = memory.items() if memory.multi_label else None
        return held_out(groups, memory.store, memory.index, memory.stats.labels, rows)

    def _plain(
        self, name: str, stats: RunningStatistics, excluded: frozenset[int] = frozenset()
    ) -> Scorer:
        """A scorer of the embedding space (not a feature space, not a combination)."""
        memory = self._memory
        items = memory.items() if name == "knn" else None
        if name not in ("description", "ncm"):
            return build_scorer(name, stats, memory.config, memory.index, items, excluded)
        texts = {"label_vectors": memory.label_vectors, "described": memory.label_set.described()}
        return build_scorer(name, stats, memory.config, memory.index, items, excluded, **texts)

    def _novelty(self) -> float:
        """The stored choice's standing of labels with no example (see :class:`Combination`)."""
        choice = self._memory.choice
        return (choice.novelty if choice is not None else None) or 0.0
