"""A random feature space's learner state (RanPAC, KLDA): per-label sums and the regularised
inverse of the Gram matrix, updated by each session for what it adds.

- ``ridge`` (ranpac): the ridge from features ``[phi, 1]`` to label indicators,
  ``W = (G + lambda I)^-1 X^T Y``; ``G`` counts every item once.
- ``lda`` (klda): the shared-covariance discriminant, whose shrunk covariance is, up to a scale,
  ``S + beta I`` with ``S = A - sum_c s_c s_c^T / n_c`` the within-class scatter (``A``: the Gram
  of the features, each row weighted by its label count in a multi-label store). The space keeps
  ``(A + beta I)^-1``; the class-mean term is a rank-``C`` correction applied when solving.

A session adds its rows to ``(G + s I)^-1`` by the recursive update of analytic class-incremental
learning (:class:`~icl_cl.memory.inverse_gram.InverseGram`): ``O(n M^2)`` for ``n`` rows, never a
new ``O(M^3)`` factorisation. The strength ``s`` is fixed between the fit step's choices (a
choice is made again once the store has grown by a stated factor), so for a fixed strength,
sessions learned one by one equal their union. What ``predict`` needs is solved here into a
:class:`~icl_cl.memory.scorers.LinearHead` (float32 weights and biases), which
:mod:`~icl_cl.memory.feature_checkpoint` saves apart from the learner state.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from icl_cl.memory.inverse_gram import InverseGram, Operator, low_rank_update
from icl_cl.memory.item_groups import Additions, stored_additions
from icl_cl.memory.partial import merge
from icl_cl.memory.random_features import RandomFeatures
from icl_cl.memory.scorers import LinearHead, oas_shrinkage
from icl_cl.memory.statistics import RunningStatistics, StatisticsDelta

logger = logging.getLogger(__name__)

SpaceKind = Literal["ridge", "lda"]
# Rows turned into features at a time.
_BLOCK = 2048
# The most shrinkage klda's strength is derived from (at 1 the covariance is the identity, and
# its strength infinite).
_MOST_SHRINKAGE = 0.99


@dataclass(frozen=True)
class SpaceDelta:
    """What a session adds to a feature space: its label sums (``stats``) and its rows, or their
    Gram already summed by workers (``gram``)."""

    stats: StatisticsDelta
    added: Additions
    gram: np.ndarray | None = None


@dataclass
class Strength:
    """The regularisation of a space and the scale of its scores.

    Attributes:
        value: Added to the Gram's diagonal (ranpac's ``lambda``, klda's ``beta``).
        scale: klda's ``1 / (1 - a)`` for the shrinkage ``a`` it was derived from (scores then
            equal the shrunk-covariance discriminant's); 1 for ranpac.
    """

    value: float
    scale: float


def _class_terms(stats: RunningStatistics) -> tuple[np.ndarray, int]:
    """``s_c / sqrt(n_c)`` of each label with examples (so that their outer products sum to
    ``sum_c s_c s_c^T / n_c``), and the scatter's degrees of freedom."""
    counts = stats.counts
    seen = counts > 0
    dof = max(int(counts.sum()) - int(seen.sum()), 1)
    return stats.sums[seen] / np.sqrt(counts[seen])[:, None], dof


class FeatureSpace:
    """Label sums and the inverse Gram of the stored items' random features.

    Args:
        kind: ``ridge`` (ranpac) or ``lda`` (klda).
        features: The fixed feature map.
        stats: Counts and sums of the features, label columns aligned with the store's.
        solver: ``(G + s I)^-1``.
        scale: The scores' scale (see :class:`Strength`).
        rows: Stored rows (from the first) that the state covers.
        items: Rows grouped into items (a multi-label store).
    """

    def __init__(
        self,
        kind: SpaceKind,
        features: RandomFeatures,
        stats: RunningStatistics,
        solver: InverseGram,
        scale: float,
        rows: int,
        items: bool,
    ) -> None:
        self.kind, self.features, self.stats, self.solver = kind, features, stats, solver
        self.scale, self.rows, self.items = scale, rows, items
        self._eigen: tuple[np.ndarray, np.ndarray] | None = None
        # The stored choice (its store size) the strength was set for; ``None``: the config's.
        self.choice: int | None = None
        # Items the strength was set at: it is set again once the store has doubled.
        self.strength_items = stats.n_examples

    def eigen(self) -> tuple[np.ndarray, np.ndarray]:
        """The Gram's eigendecomposition (``O(M^3)``, kept until the state changes): ranpac's
        strength path and its new strength share one."""
        if self._eigen is None:
            self._eigen = self.solver.eigen()
        return self._eigen

    @property
    def weighted(self) -> bool:
        """Whether rows enter the Gram weighted by their label count (klda, multi-label)."""
        return self.kind == "lda" and self.items

    # ---- building --------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        kind: SpaceKind,
        features: RandomFeatures,
        *,
        labels: Sequence[str],
        vectors: np.ndarray,
        row_labels: Sequence[Sequence[str]],
        inputs: Sequence[str | None],
        items: bool,
        strength: Callable[[FeatureSpace, np.ndarray], Strength],
    ) -> FeatureSpace:
        """The state of every stored row, from scratch: sums and Gram from the vectors (grouped
        into items by ``inputs``), then one factorisation at the ``strength`` it gives."""
        stats = RunningStatistics(features.size, weighted=False, gram=False)
        for label in labels:
            stats.add_label(label)
        space = cls(kind, features, stats, InverseGram(np.zeros((0, 0)), 0.0), 1.0, 0, items)
        size = features.size + (1 if kind == "ridge" else 0)
        gram = np.zeros((size, size))
        for added, _rows in stored_additions(vectors, row_labels, inputs, stats.col, chunk=_BLOCK):
            stats.apply(added.delta(stats, features.transform))
            for x in space.gram_rows(added):
                gram += x.T @ x
        space.rows = len(vectors)
        space.strength_items = stats.n_examples
        chosen = strength(space, gram)
        space.solver = InverseGram.of_gram(gram, chosen.value)
        space.scale = chosen.scale
        return space

    def gram_rows(self, added: Additions) -> list[np.ndarray]:
        """Per block, the rows ``added`` contributes to the Gram: ranpac's ``[phi, 1]`` of each
        new item; klda's ``sqrt(m) phi`` of each row adding ``m`` labels (multi-label) or
        ``phi`` of each new example."""
        out = []
        for lo in range(0, len(added.vectors), _BLOCK):
            x = self.features.transform(added.vectors[lo : lo + _BLOCK])
            if self.kind == "ridge":
                x = np.hstack([x, np.ones((len(x), 1))])[added.opens[lo : lo + _BLOCK]]
            elif self.weighted:
                m = np.array([len(labs) for labs in added.labels[lo : lo + _BLOCK]], np.float64)
                x = x * np.sqrt(m)[:, None]
            else:
                x = x[added.opens[lo : lo + _BLOCK]]
            out.append(x)
        return out

    # ---- sessions --------------------------------------------------------------------------

    def delta(self, added: Additions) -> SpaceDelta:
        """What new rows add (label sums now; their Gram rows when applied)."""
        return SpaceDelta(added.delta(self.stats, self.features.transform), added)

    def summed_delta(self, parts: Sequence[StatisticsDelta], added: Additions) -> SpaceDelta:
        """The delta of ``added`` from the sums workers computed of its shards, in order
        (:func:`~icl_cl.memory.partial.shard_space_statistics` with this space's map): their
        label sums merged into this space's columns, and the Gram of their rows as
        :meth:`gram_rows` would give it (ranpac: ``[phi, 1]``; klda: each row weighted by its label
        count in a multi-label store)."""
        merged = merge(parts, self.stats)
        if self.kind == "ridge":
            gram = merged.gram
        elif self.weighted:
            gram = merged.weighted_gram
        else:
            gram = merged.gram[:-1, :-1]
        if gram is None or len(gram) != self.solver.size:
            raise ValueError(f"feature space {self.features.name}: shard sums of another width")
        stats = dataclasses.replace(merged, gram=np.zeros((0, 0)), weighted_gram=None)
        return SpaceDelta(stats, added, gram)

    def apply(self, delta: SpaceDelta, rows: int) -> None:
        """Take a committed session's delta of ``rows`` stored rows: ``O(n M^2)``, or ``O(M^3)``
        for a Gram summed by workers."""
        self.stats.apply(delta.stats)
        if delta.gram is not None:
            self.solver.add_gram(delta.gram)
        else:
            for x in self.gram_rows(delta.added):
                self.solver.add_rows(x)
        self.rows += rows
        self._eigen = None

    # ---- solving ---------------------------------------------------------------------------

    def head(self, prototypes: np.ndarray | None) -> LinearHead:
        """The linear scorer of the current state (``prototypes``: klda's class means)."""
        return self._solve(self.solver.apply, self.stats, prototypes)

    def heldout_head(
        self,
        vectors: np.ndarray,
        labels: Sequence[Sequence[str]],
        prototypes: Callable[[RunningStatistics], np.ndarray | None],
    ) -> LinearHead:
        """The scorer had the items ``vectors`` (with all their ``labels``) never been learned:
        exact, by Woodbury, ``O(n M^2)`` with no new factorisation."""
        held = Additions(vectors, [list(x) for x in labels], np.ones(len(vectors), bool), True)
        stats = self.stats.without(held.delta(self.stats, self.features.transform))
        rows = np.vstack(self.gram_rows(held)) if len(vectors) else np.zeros((0, 1))
        apply = self.solver.without_rows(rows) if len(vectors) else self.solver.apply
        return self._solve(apply, stats, prototypes(stats))

    def _solve(
        self, apply: Operator, stats: RunningStatistics, prototypes: np.ndarray | None
    ) -> LinearHead:
        counts = stats.counts
        if self.kind == "ridge":
            targets = np.hstack([stats.sums, counts[:, None].astype(np.float64)]).T
            w = apply(targets)  # (M + 1, C)
            return LinearHead(w[:-1].T, w[-1], counts)
        terms, dof = _class_terms(stats)
        precision = low_rank_update(apply, terms.T, sign=-1.0)  # (S + beta I)^-1
        protos = stats.means() if prototypes is None else prototypes
        w = precision(protos.T)  # (M, C)
        s = dof * self.scale
        return LinearHead(2 * s * w.T, -s * np.einsum("cm,mc->c", protos, w), counts)

    # ---- strength --------------------------------------------------------------------------

    def ridge_strength(self, trace: float, rho: float) -> Strength:
        """ranpac's ``lambda = rho * trace(G) / dim(G)``."""
        return Strength(rho * max(trace / (self.features.size + 1), 1e-12), 1.0)

    def lda_strength(self, gram: np.ndarray, shrinkage: float | str) -> Strength:
        """klda's ``beta`` for the shrinkage ``a`` (``auto``: the Oracle Approximating Shrinkage
        estimate of the covariance ``S / dof``): ``(1 - a) S / dof + a tr(S) / (d dof) I`` is
        ``(1 - a) / dof (S + beta I)`` with ``beta = a tr(S) / ((1 - a) d)``."""
        terms, dof = _class_terms(self.stats)
        scatter = gram - terms.T @ terms
        a = oas_shrinkage(scatter / dof, dof) if shrinkage == "auto" else float(shrinkage)
        a = min(a, _MOST_SHRINKAGE)
        d = len(gram)
        beta = a * max(float(np.trace(scatter)), 1e-12) / ((1 - a) * d)
        return Strength(max(beta, 1e-12), 1.0 / (1.0 - a))

    def restrengthen(
        self,
        strength: Strength,
        *,
        eigen: tuple[np.ndarray, np.ndarray] | None = None,
        gram: np.ndarray | None = None,
    ) -> None:
        """Use another strength, from the Gram's eigendecomposition or the Gram itself (each
        ``O(M^3)``: only when a choice is made again)."""
        if eigen is not None:
            self.solver = InverseGram.of_eigen(*eigen, strength.value)
        else:
            self.solver = InverseGram.of_gram(
                self.solver.gram() if gram is None else gram, strength.value
            )
        self.scale = strength.scale
        self._eigen = None
