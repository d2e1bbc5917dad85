"""Candidate scorers of the ECL. Each is a few lines over the same running statistics.

Every scorer maps query vectors ``(n, dim)`` to scores ``(n, n_labels)``, higher meaning more
likely. Labels that have no example yet score ``-inf`` (they are never candidates).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from icl_cl.memory.few_shot_prototypes import calibrated_means
from icl_cl.memory.statistics import RunningStatistics

if TYPE_CHECKING:
    from icl_cl.config import MemoryConfig
    from icl_cl.memory.example_index import ExampleIndex
    from icl_cl.memory.item_groups import ItemGroups
    from icl_cl.memory.random_features import RandomFeatures


class Scorer(Protocol):
    """Scores every known label for each query."""

    name: str

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Return ``(n_queries, n_labels)`` float32 scores."""
        ...


def _mask_unseen(scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    scores[:, counts == 0] = -np.inf
    return scores


def fill_unseen(scores: np.ndarray, novelty: float = 0.0) -> np.ndarray:
    """``scores`` with each ``-inf`` (a label the scorer knows nothing of, having no example)
    raised to the lowest finite score of its row plus ``novelty`` times the row's standard
    deviation: where another scorer of a combination ranks such a label (by its description),
    this one counts it as its least likely label (0), or closer to a typical one, as the fit
    step chose on held-out items."""
    unseen = ~np.isfinite(scores)
    if not unseen.any():
        return scores
    floor, spread = row_floor(scores)
    return np.where(unseen, floor + novelty * spread, scores).astype(scores.dtype, copy=False)


def row_floor(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, ``(n, 1)`` each: the lowest finite score (0 where there is none) and the
    standard deviation of the finite scores."""
    finite = np.isfinite(scores)
    values = np.where(finite, scores, np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a row with no finite score
        floor = np.nanmin(values, axis=1, keepdims=True)
        spread = np.nanstd(values, axis=1, keepdims=True)
    return np.nan_to_num(floor), np.nan_to_num(spread)


class NearestClassMean:
    """SimpleCIL: cosine similarity to each class mean of frozen embeddings."""

    name = "ncm"

    def __init__(
        self,
        stats: RunningStatistics,
        prototypes: np.ndarray | None = None,
        known: np.ndarray | None = None,
    ) -> None:
        """``prototypes`` replaces the class means (calibrated ones, or with a description
        prior); default: the plain means. ``known`` marks the labels it scores (default: those
        with an example)."""
        means = stats.means() if prototypes is None else prototypes
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        self._prototypes = np.ascontiguousarray((means / np.maximum(norms, 1e-12)).T, np.float32)
        self._counts = (stats.counts if known is None else known.astype(np.int64)).copy()

    def scores(self, queries: np.ndarray) -> np.ndarray:
        return _mask_unseen(queries @ self._prototypes, self._counts)


class Mahalanobis:
    """InCA/KLDA: negative Mahalanobis distance to class means under one shared covariance.

    The covariance is the pooled within-class scatter, shrunk towards a scaled identity
    (``(1-a) S + a tr(S)/d I``) so that it stays invertible with few examples. With
    ``shrinkage="auto"`` the weight ``a`` is the Oracle Approximating Shrinkage estimate
    (Chen et al. 2010), which needs only ``S`` and the degrees of freedom: near 1 with a handful
    of examples, near 0 with many.
    """

    name = "mahalanobis"

    def __init__(
        self,
        stats: RunningStatistics,
        shrinkage: float | str,
        distances: bool = True,
        prototypes: np.ndarray | None = None,
    ) -> None:
        """``prototypes`` replaces the class means the distances are measured to (calibrated
        ones); the covariance is always the scatter around the plain means."""
        counts = stats.counts
        seen = counts > 0
        means = stats.means()
        # Within-class scatter from running sums: sum_c sum_{x in c} (x-mu_c)(x-mu_c)^T (in a
        # single-label feature space only the Gram is kept: each example then counts once).
        gram = stats.weighted_gram if stats.weighted_gram is not None else stats.gram[:-1, :-1]
        scatter = gram - stats.sums[seen].T @ means[seen]
        dof = max(int(counts.sum()) - int(seen.sum()), 1)
        cov = scatter / dof
        d = cov.shape[0]
        if shrinkage == "auto":
            shrinkage = oas_shrinkage(cov, dof)
        self.shrinkage = float(shrinkage)
        cov = (1 - self.shrinkage) * cov + self.shrinkage * (np.trace(cov) / d) * np.eye(d)
        # Without ``distances`` the per-query term -q^T P q, the same for every label, is left
        # out: the same ranking (a linear discriminant) at a fraction of the cost in wide
        # feature spaces, where the precision matrix is never formed.
        self._precision: np.ndarray | None = None
        if prototypes is not None:
            means = prototypes
        if distances:
            precision = np.linalg.inv(cov)
            weights = means @ precision  # (C, d)
            self._precision = precision.astype(np.float32)
        else:
            from scipy.linalg import cho_factor, cho_solve

            weights = cho_solve(cho_factor(cov, overwrite_a=True), means.T).T
        self._weights = np.ascontiguousarray(weights.T, np.float32)
        self._bias = np.einsum("cd,cd->c", weights, means).astype(np.float32)
        self._counts = counts.copy()

    def scores(self, queries: np.ndarray) -> np.ndarray:
        # -(q-mu)^T P (q-mu) = -q^T P q + 2 q^T P mu - mu^T P mu
        linear = 2 * (queries @ self._weights) - self._bias[None, :]
        if self._precision is not None:
            linear = linear - np.einsum("nd,de,ne->n", queries, self._precision, queries)[:, None]
        return _mask_unseen(linear, self._counts)


def oas_shrinkage(cov: np.ndarray, n: int) -> float:
    """Oracle Approximating Shrinkage weight towards ``tr(S)/d I`` for a sample covariance ``S``
    estimated from ``n`` samples (the form scikit-learn's ``oas`` uses)."""
    d = cov.shape[0]
    tr = float(np.trace(cov))
    tr2 = float(np.sum(cov * cov))  # tr(S^2) for symmetric S
    denominator = (n + 1) * (tr2 - tr * tr / d)
    if denominator <= 0:
        return 1.0
    return float(min(1.0, (tr2 + tr * tr) / denominator))


class Ridge:
    """Analytic class-incremental learning (ACIL): ridge regression from embeddings to label indicators.

    ACIL updates ``R = (X^T X + g I)^-1`` and ``W`` recursively; both are functions of the running
    Gram matrix ``X^T X`` and of ``X^T Y``, whose columns are exactly the per-label sums. Keeping
    those sums and solving when asked is the same estimator (joint ridge on all data seen), costs
    nothing per session beyond the sums, and adds a column per new label.
    """

    name = "ridge"

    def __init__(self, stats: RunningStatistics, ridge_lambda: float) -> None:
        from scipy.linalg import cho_factor, cho_solve

        d1 = stats.gram.shape[0]
        system = stats.gram + ridge_lambda * np.eye(d1)
        targets = np.hstack(
            [stats.sums, stats.counts[:, None].astype(np.float64)]
        )  # X~^T Y, (C, d+1)
        # Cholesky: the system is symmetric positive definite, and half the cost of an LU solve
        # matters once the features are thousands wide.
        weights = cho_solve(cho_factor(system, overwrite_a=True), targets.T)  # (d+1, C)
        self._weights = np.ascontiguousarray(weights[:-1], np.float32)
        self._bias = weights[-1].astype(np.float32)
        self._counts = stats.counts.copy()

    def scores(self, queries: np.ndarray) -> np.ndarray:
        return _mask_unseen(queries @ self._weights + self._bias[None, :], self._counts)


class KnnVote:
    """kNN label vote over stored items: a label's score is the summed similarity of the ``k``
    nearest items that carry it (copies of one input learned in several sessions vote once, with
    the union of their labels; see :class:`~icl_cl.memory.item_groups.ItemGroups`). Class-mean
    cosine, scaled down, orders the labels no neighbour has."""

    name = "knn"
    _TIE_BREAK = 1e-3

    def __init__(
        self,
        stats: RunningStatistics,
        index: ExampleIndex,
        items: ItemGroups,
        k: int,
        excluded: frozenset[int] = frozenset(),
    ) -> None:
        self._ncm = NearestClassMean(stats)
        self._index = index
        self._items = items
        self._k = k
        self._excluded = excluded  # rows held out: they never vote

    def scores(self, queries: np.ndarray) -> np.ndarray:
        scores = self._TIE_BREAK * self._ncm.scores(queries)
        # Enough rows for k distinct items once held-out rows and extra copies are skipped.
        depth = self._k * self._items.max_copies + len(self._excluded)
        sims, rows = self._index.search(queries, depth)
        items = self._items.item_of(rows)
        for i in range(len(queries)):
            voted: set[int] = set()
            for sim, row, item in zip(sims[i], rows[i], items[i], strict=True):
                if row < 0 or item in voted or int(row) in self._excluded:
                    continue
                scores[i, self._items.labels[item]] += max(float(sim), 0.0)
                voted.add(int(item))
                if len(voted) == self._k:
                    break
        return scores


class LabelDescription:
    """Cosine similarity of the query to each label's own text (its name and description): the
    one scorer that ranks labels with no example yet, such as tags known only by description."""

    name = "description"

    def __init__(self, label_vectors: np.ndarray) -> None:
        self._labels = np.ascontiguousarray(_unit(label_vectors).T, np.float32)

    def scores(self, queries: np.ndarray) -> np.ndarray:
        return queries @ self._labels


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def described_means(
    stats: RunningStatistics,
    means: np.ndarray,
    label_vectors: np.ndarray,
    described: np.ndarray,
    prior: float,
) -> np.ndarray:
    """Class means in which each described label's embedded text counts as ``prior`` examples:
    ``(n m + a t) / (n + a)`` for a label with ``n`` examples, mean ``m`` and unit text vector
    ``t``; a label with no example is its text (rows of undescribed labels are unchanged)."""
    n = stats.counts[:, None].astype(np.float64)
    blended = (n * means + prior * _unit(label_vectors)) / (n + prior)
    return np.where(described[:, None], blended, means)


class LinearHead:
    """A solved linear scorer, ``q W^T + b``: what a prediction needs of a feature scorer (its
    weights and biases in float32), apart from the learner state they were solved from."""

    name = "linear"

    def __init__(self, weights: np.ndarray, bias: np.ndarray, counts: np.ndarray) -> None:
        self.weights = np.ascontiguousarray(weights, np.float32)  # (C, M)
        self.bias = np.asarray(bias, np.float32)
        self.counts = np.asarray(counts).copy()

    def scores(self, queries: np.ndarray) -> np.ndarray:
        return _mask_unseen(queries @ self.weights.T + self.bias[None, :], self.counts)


class InFeatureSpace:
    """A scorer over a random feature space (RanPAC, KLDA): queries are mapped first, in blocks
    so that the wide features of a large batch are never held at once."""

    _BLOCK = 2048

    def __init__(self, name: str, features: RandomFeatures, inner: Scorer) -> None:
        self.name = name
        self._features = features
        self._inner = inner

    def scores(self, queries: np.ndarray) -> np.ndarray:
        parts = [
            self._inner.scores(self._features.transform(queries[lo : lo + self._BLOCK]))
            for lo in range(0, len(queries), self._BLOCK)
        ]
        if not parts:
            return self._inner.scores(self._features.transform(queries))
        return np.vstack(parts)


# Scorers built on a random feature space rather than on the embeddings themselves.
FEATURE_SCORERS = ("ranpac", "klda")


def class_prototypes(stats: RunningStatistics, config: MemoryConfig) -> np.ndarray:
    """The class means the mean-based scorers use: few-shot labels' calibrated (TEEN)."""
    return calibrated_means(stats, config.teen_max_examples, config.teen_alpha, config.teen_tau)


def build_scorer(
    name: str,
    stats: RunningStatistics,
    config: MemoryConfig,
    index: ExampleIndex,
    items: ItemGroups | None,
    excluded: frozenset[int] = frozenset(),
    label_vectors: np.ndarray | None = None,
    described: np.ndarray | None = None,
) -> Scorer:
    """Construct the named scorer (not a feature scorer) from the current statistics.

    ``label_vectors`` are the embedded label texts in column order (the ``description`` scorer,
    and ncm's description prior for the labels ``described`` marks)."""
    if name in FEATURE_SCORERS:
        raise ValueError(f"the {name} scorer is solved from its feature space, not built here")
    if name == "ncm":
        prototypes = class_prototypes(stats, config)
        if described is None or label_vectors is None or config.description_prior == 0:
            return NearestClassMean(stats, prototypes)
        prototypes = described_means(
            stats, prototypes, label_vectors, described, config.description_prior
        )
        return NearestClassMean(stats, prototypes, known=(stats.counts > 0) | described)
    if name == "mahalanobis":
        return Mahalanobis(stats, config.shrinkage, prototypes=class_prototypes(stats, config))
    if name == "ridge":
        return Ridge(stats, config.ridge_lambda)
    if name == "description":
        if label_vectors is None:
            raise ValueError("the description scorer needs the label vectors")
        return LabelDescription(label_vectors)
    if name == "knn":
        if items is None:
            raise ValueError("the kNN scorer needs the labels of stored items")
        return KnnVote(stats, index, items, config.knn_neighbors, excluded)
    raise ValueError(f"unknown scorer {name!r}")


# Scores held at once when ranking a batch of queries (a block of queries times the labels):
# 16M, 128 MB in float64.
SCORES_PER_BLOCK = 1 << 24


def ranked_labels(
    scores: np.ndarray, labels: Sequence[str], k: int
) -> list[list[tuple[str, float]]]:
    """Top-``k`` ``(label, score)`` per row of a score matrix, dropping labels with no score."""
    cols, values = top_k(scores, k)
    return [
        [(labels[c], float(v)) for c, v in zip(row_c, row_v, strict=True) if np.isfinite(v)]
        for row_c, row_v in zip(cols, values, strict=True)
    ]


def rank_in_blocks(
    scorer: Scorer, queries: np.ndarray, labels: Sequence[str], k: int
) -> list[list[tuple[str, float]]]:
    """:func:`ranked_labels` of each query, scored in blocks, so that a large batch over many
    labels never holds every score at once."""
    queries = np.ascontiguousarray(queries, np.float32)
    block = max(1, SCORES_PER_BLOCK // max(len(labels), 1))
    out: list[list[tuple[str, float]]] = []
    for lo in range(0, len(queries), block):
        out.extend(ranked_labels(scorer.scores(queries[lo : lo + block]), labels, k))
    return out


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` best labels per row, best first (``-inf`` entries dropped later)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_scores, order, axis=1)


__all__ = [
    "KnnVote",
    "LabelDescription",
    "LinearHead",
    "Mahalanobis",
    "NearestClassMean",
    "Ridge",
    "Scorer",
    "build_scorer",
    "fill_unseen",
    "rank_in_blocks",
    "ranked_labels",
    "row_floor",
    "top_k",
]
