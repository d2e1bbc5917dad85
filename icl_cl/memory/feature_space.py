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

Held-out scoring (an audit scores every stored item so, a fit its held-out sample) needs the
scores of a fold's items by the space without them, not that space's head: the fold-wise
cross-validation identities (:func:`ridge_heldout`, :func:`lda_heldout`) give them from the
fold's quadratic forms in ``K`` alone, which the Cholesky factor of ``K`` makes a triangular
product (:meth:`InverseGram.mapped`, ``n M^2 / 2`` for ``n`` items): well under half the work of
solving the fold's head (its ``K X_f^T``, ``n M^2``, then ``K`` applied to the ``C`` targets,
twice for klda) and scoring the items with it.
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
from icl_cl.memory.scorers import InFeatureSpace, LinearHead, Scorer, oas_shrinkage
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


@dataclass(frozen=True)
class HeldOutFold:
    """Items held out of a feature space, lifted into it once.

    Attributes:
        features: Their features ``(n, M)``.
        rows: Their Gram rows (:meth:`FeatureSpace.gram_rows`).
        indicators: ``(n, C)``: how often each item carries each label (0 or 1).
        stats: The space's label statistics without them.
    """

    features: np.ndarray
    rows: np.ndarray
    indicators: np.ndarray
    stats: RunningStatistics


def ridge_heldout(rows: np.ndarray, targets: np.ndarray, indicators: np.ndarray) -> np.ndarray:
    """The ridge's scores of a fold's rows had they never been learned (see
    :mod:`~icl_cl.memory.ridge_path`): with ``H = X_f K X_f^T`` and the full-store predictions
    ``X_f W``, ``(I - H)^-1 (X_f W - H Y_f)``; nothing of the fold is solved for the ``C``
    targets, only an ``n x n`` system.

    Args:
        rows: ``U X_f^T`` (:meth:`InverseGram.mapped`): the fold's Gram rows ``[phi, 1]``.
        targets: ``U B`` for the store's ridge targets ``B = X^T Y`` (sums and counts).
        indicators: ``Y_f``, the fold's labels.
    """
    n = rows.shape[1]
    products = rows.T @ np.hstack([rows, targets])  # H, then X_f W: one product
    # (I - H)^-1 (X_f W - H Y_f) = Y_f + (I - H)^-1 (X_f W - Y_f): each residual over 1 - H.
    return indicators + np.linalg.solve(np.eye(n) - products[:, :n], products[:, n:] - indicators)


def lda_heldout(
    queries: np.ndarray, weights: np.ndarray, terms: np.ndarray, protos: np.ndarray, scale: float
) -> np.ndarray:
    """klda's scores ``s (2 q^T P z_c - z_c^T P z_c)`` of a fold's items ``q`` against the
    prototypes ``z_c``, with the precision of the store without the fold
    ``P = (K^-1 - X_f^T X_f - T T^T)^-1``: its Gram rows ``X_f`` and the class terms ``T``
    (``s_c / sqrt(n_c)`` of the sums without it) taken out of ``K^-1`` by one Woodbury step of
    rank ``r = n + C``, applied to nothing but the ``C`` prototypes.

    Every argument comes mapped by ``U`` (``K = U^T U``), so that ``a^T K b`` is ``a^T b``.
    With ``V = [X_f^T, T]`` and ``S = I - V^T K V``, ``V^T P z = S^-1 V^T K z`` (Woodbury), and
    ``z^T P z = z^T K z + (V^T K z)^T S^-1 V^T K z``; an item's Gram row is its features times
    its weight, so its ``q^T P z`` is a row of the same solve: one ``r x r`` system, no product
    wider than ``r`` columns (an item of weight 0, with no label, adds no Gram row: its own
    ``q^T K z + q^T K V S^-1 V^T K z``).

    Args:
        queries: ``(M, n)`` the fold's items' features.
        weights: ``(n,)`` each item's Gram row over its features (1, or ``sqrt`` of its label
            count in a multi-label store).
        terms: ``(M, C')`` the class terms of the labels with examples left.
        protos: ``(M, C)`` the prototypes.
        scale: ``s``: the scatter's degrees of freedom times the space's scale.
    """
    low = np.hstack([queries * weights, terms])
    r = low.shape[1]
    products = low.T @ np.hstack([low, protos])  # V^T K V, then V^T K z: one product
    across = products[:, r:]
    solved = np.linalg.solve(np.eye(r) - products[:, :r], across)  # V^T P z
    kept = weights > 0
    items = np.empty((len(weights), protos.shape[1]))
    items[kept] = solved[: len(weights)][kept] / weights[kept, None]
    if not kept.all():
        alone = queries[:, ~kept].T
        items[~kept] = alone @ protos + (alone @ low) @ solved
    both = np.einsum("mc,mc->c", protos, protos) + np.einsum("kc,kc->c", across, solved)
    return scale * (2 * items - both[None, :])


class HeldOutScorer:
    """A feature scorer had some stored items never been learned, as a
    :class:`~icl_cl.memory.scorers.Scorer`: the held-out items themselves (what every caller
    scores: a fold's items) get the scores computed for them without solving a head
    (:meth:`FeatureSpace.heldout_scores`); any other query is scored by the held-out head,
    solved on first use.

    A query is one of the items when its vector equals one of theirs exactly (the same stored
    vector): equal vectors have equal features, so equal scores either way.

    Args:
        name: The scorer's name.
        vectors: The held-out items' vectors.
        scores: Their held-out scores, one row each.
        head: Solves the held-out scorer of any query.
    """

    def __init__(
        self, name: str, vectors: np.ndarray, scores: np.ndarray, head: Callable[[], Scorer]
    ) -> None:
        self.name = name
        self._own = scores
        rows = np.ascontiguousarray(vectors, np.float64)
        self._width = rows.shape[1] if rows.ndim == 2 else -1
        self._at: dict[bytes, int] = {}
        for i, row in enumerate(rows if rows.ndim == 2 else ()):
            self._at.setdefault(row.tobytes(), i)
        self._solve = head
        self._head: Scorer | None = None

    def scores(self, queries: np.ndarray) -> np.ndarray:
        at = self._positions(queries)
        if at is not None:
            return self._own[at]
        if self._head is None:
            self._head = self._solve()
        return self._head.scores(queries)

    def _positions(self, queries: np.ndarray) -> np.ndarray | None:
        """Which held-out item each query is, or ``None`` when one is none of them."""
        if queries.ndim != 2 or queries.shape[1] != self._width:
            return None
        found = [self._at.get(row.tobytes()) for row in np.ascontiguousarray(queries, np.float64)]
        if any(i is None for i in found):
            return None
        return np.asarray(found, np.int64)


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
        # U times the label sums (see _mapped_sums), with the (rows, labels) they were made at.
        self._mapped: tuple[tuple[int, int], np.ndarray] | None = None
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
        blocks = range(0, len(added.vectors), _BLOCK)
        return [
            self._gram_block(
                self.features.transform(added.vectors[lo : lo + _BLOCK]),
                added.labels[lo : lo + _BLOCK],
                added.opens[lo : lo + _BLOCK],
            )
            for lo in blocks
        ]

    def _gram_block(
        self, x: np.ndarray, labels: Sequence[Sequence[str]], opens: np.ndarray
    ) -> np.ndarray:
        """:meth:`gram_rows` of rows whose features are ``x``."""
        if self.kind == "ridge":
            return np.hstack([x, np.ones((len(x), 1))])[opens]
        if self.weighted:
            return x * np.sqrt(np.array([len(labs) for labs in labels], np.float64))[:, None]
        return x[opens]

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
        self._eigen = self._mapped = None

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
        fold = self._fold(vectors, labels)
        apply = self.solver.without_rows(fold.rows) if len(vectors) else self.solver.apply
        return self._solve(apply, fold.stats, prototypes(fold.stats))

    def heldout_scorer(
        self,
        name: str,
        vectors: np.ndarray,
        labels: Sequence[Sequence[str]],
        prototypes: Callable[[RunningStatistics], np.ndarray | None],
    ) -> HeldOutScorer:
        """Scorer ``name`` had the items ``vectors`` (with all their ``labels``) never been
        learned: the items' own scores at once (:meth:`heldout_scores`), any other query's from
        the held-out head, solved the first time one comes (:meth:`heldout_head`)."""
        own = self.heldout_scores(vectors, labels, prototypes)
        solver, rows = self.solver, self.rows

        def head() -> Scorer:
            if self.solver is not solver or self.rows != rows:
                raise RuntimeError(f"feature space {name} changed since its items were held out")
            return InFeatureSpace(
                name, self.features, self.heldout_head(vectors, labels, prototypes)
            )

        return HeldOutScorer(name, vectors, own, head)

    def heldout_scores(
        self,
        vectors: np.ndarray,
        labels: Sequence[Sequence[str]],
        prototypes: Callable[[RunningStatistics], np.ndarray | None],
    ) -> np.ndarray:
        """Each of the items ``vectors`` (with all their ``labels``) scored by the head had they
        all never been learned, as :meth:`heldout_head` would score it, without solving that
        head: by the fold-wise cross-validation identities (:func:`ridge_heldout`,
        :func:`lda_heldout`), the fold's rows taken through one triangular product
        (:meth:`InverseGram.mapped`, ``n M^2 / 2`` for ``n`` items) where the head's solve
        costs ``(n + C) M^2`` to ``(n + 2 C) M^2`` and its scores lift the items once more."""
        fold = self._fold(vectors, labels)
        if not len(vectors):
            return np.zeros((0, len(fold.stats.labels)))
        if self.kind == "ridge":
            mapped = self.solver.mapped(fold.rows.T)
            scores = ridge_heldout(mapped, self._mapped_sums(), fold.indicators)
        else:
            scores = self._lda_heldout(fold, prototypes(fold.stats))
        scores[:, fold.stats.counts == 0] = -np.inf
        return scores

    def _fold(self, vectors: np.ndarray, labels: Sequence[Sequence[str]]) -> HeldOutFold:
        """Held-out items lifted into the space once: the statistics without them, their Gram
        rows and their label indicators."""
        features = self.features.transform(vectors)
        lists = [list(x) for x in labels]
        stats = self.stats.without(self.stats.delta(features, lists))
        rows = self._gram_block(features, lists, np.ones(len(features), bool))
        indicators = np.zeros((len(features), len(stats.labels)))
        for i, labs in enumerate(lists):
            np.add.at(indicators[i], [stats.col[lab] for lab in labs], 1.0)
        return HeldOutFold(features, rows, indicators, stats)

    def _lda_heldout(self, fold: HeldOutFold, prototypes: np.ndarray | None) -> np.ndarray:
        """:func:`lda_heldout` of a fold's items: the class sums less the fold's, their class
        terms and the prototypes, all mapped by ``U`` from the mapped sums and rows (only a
        prototype that is not its class mean, a calibrated few-shot label's, is mapped anew)."""
        stats = fold.stats
        n, counts = len(fold.features), stats.counts
        means = stats.means()
        prototypes = means if prototypes is None else prototypes
        own = ~np.all(prototypes == means, axis=1)
        # One triangular product for the items and the prototypes of their own.
        mapped = self.solver.mapped(np.vstack([fold.features, prototypes[own]]).T)
        queries = mapped[:, :n]  # U phi^T
        weights = np.sqrt(fold.indicators.sum(axis=1)) if self.weighted else np.ones(n)
        sums = self._mapped_sums() - queries @ fold.indicators  # U (sums less the fold's)^T
        seen = counts > 0
        terms = sums[:, seen] / np.sqrt(counts[seen])
        protos = sums / np.maximum(counts, 1)
        protos[:, own] = mapped[:, n:]
        dof = _class_terms(stats)[1]
        return lda_heldout(queries, weights, terms, protos, dof * self.scale)

    def _mapped_sums(self) -> np.ndarray:
        """``U`` times the label sums (ranpac: the ridge targets, sums and counts), each
        column once per state: a fold subtracts its own from them."""
        key = (self.rows, len(self.stats.labels))
        if self._mapped is None or self._mapped[0] != key:
            counts = self.stats.counts[:, None].astype(np.float64)
            sums = np.hstack([self.stats.sums, counts]) if self.kind == "ridge" else self.stats.sums
            self._mapped = (key, self.solver.mapped(sums.T))
        return self._mapped[1]

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
        self._eigen = self._mapped = None
