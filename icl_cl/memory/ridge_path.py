"""Exact held-out scores of a ridge scorer for many regularisation strengths at once.

For a fold of stored rows ``X_f`` (features with the bias column) and label indicators ``Y_f``,
the ridge learned without them predicts, with ``A = (G + lambda I)^-1``, ``H = X_f A X_f^T`` and
the full-data predictions ``Y^_f = X_f A B``::

    X_f (G - X_f^T X_f + lambda I)^-1 (B - X_f^T Y_f) = (I - H)^-1 (Y^_f - H Y_f)

(Woodbury). With one eigendecomposition ``G = Q diag(e) Q^T`` and ``P_f = X_f Q``, both ``H`` and
``Y^_f`` cost a few small products per ``lambda``: ``P_f diag(1 / (e + lambda)) P_f^T`` and
``P_f diag(1 / (e + lambda)) Q^T B``. So every fold and every ``lambda`` is scored exactly as if
those rows had never been learned, for the price of one ``M^3`` decomposition.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from icl_cl.memory.statistics import RunningStatistics

# Relative strengths tried: lambda = rho * (mean eigenvalue of the Gram), so the grid does not
# depend on the store's size or the feature scale.
RHO_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def heldout_ridge_scores(
    eigen: tuple[np.ndarray, np.ndarray],
    stats: RunningStatistics,
    folds: Sequence[tuple[np.ndarray, Sequence[Sequence[str]]]],
    rhos: Sequence[float] = RHO_GRID,
) -> dict[float, list[np.ndarray]]:
    """Held-out scores ``(n_f, n_labels)`` of every fold, for each relative strength.

    Args:
        eigen: The eigendecomposition ``(e, Q)`` of the Gram of every stored row's features with
            the bias column (the folds' rows included).
        stats: The label counts and sums of those features.
        folds: Per fold, the features of its rows (without the bias column) and their labels.
        rhos: Relative strengths: ``lambda = rho * mean(e)``, so the grid does not depend on the
            store's size or the feature scale.

    Labels with no example left once a fold is out score ``-inf`` for that fold, as the ridge
    does.
    """
    eigenvalues, q = eigen
    targets = np.hstack([stats.sums, stats.counts[:, None].astype(np.float64)]).T  # X~^T Y
    qb = q.T @ targets
    scale = max(float(eigenvalues.mean()), 1e-12)
    col = stats.col
    out: dict[float, list[np.ndarray]] = {rho: [] for rho in rhos}
    for features, label_lists in folds:
        x = np.hstack([np.asarray(features, np.float64), np.ones((len(features), 1))])
        y = np.zeros((len(x), len(stats.labels)))
        for i, labels in enumerate(label_lists):
            y[i, [col[label] for label in labels]] = 1.0
        p = x @ q
        left = stats.counts - y.sum(axis=0).astype(np.int64)
        for rho in rhos:
            inv = 1.0 / (eigenvalues + rho * scale)
            pd = p * inv
            h = pd @ p.T
            fitted = pd @ qb
            scores = np.linalg.solve(np.eye(len(x)) - h, fitted - h @ y)
            scores[:, left <= 0] = -np.inf
            out[rho].append(scores.astype(np.float32))
    return out
