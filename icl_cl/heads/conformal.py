"""Split-conformal label sets with a stated coverage ``1 - alpha``."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np


class SplitConformal:
    """Least-ambiguous set-valued classifier (LAC): the set holds every label whose probability is
    at least ``1 - q``, where ``q`` is the conformal quantile of the calibration non-conformity.

    Single-label, the non-conformity of an item is ``1 - p(gold)``. Multi-label, ``cover``
    says what the rate is about: ``"each"`` gold label (one score ``1 - p(g)`` per item and gold
    label: a tagger's sets hold that share of the true tags) or ``"all"`` of an item's gold
    labels at once (``1 - min p(g)``: the whole gold set is inside the set). With exchangeable
    calibration and test data, ``P(covered) >= 1 - alpha``. The sorted scores are kept, so any
    ``alpha`` can be asked for after fitting.
    """

    def __init__(self, alpha: float = 0.1, cover: str = "all") -> None:
        if cover not in ("each", "all"):
            raise ValueError(f"cover must be 'each' or 'all', got {cover!r}")
        self.alpha = _check_alpha(alpha)
        self.cover = cover
        self.scores = np.zeros(0)

    def fit(
        self, probabilities: np.ndarray, labels: np.ndarray | Sequence[Collection[int]]
    ) -> SplitConformal:
        """``probabilities (n, k)``. ``labels``: per row the gold column (single-label) or a
        collection of gold columns (multi-label). ``-1`` marks a gold label that is not among the
        candidates: its non-conformity is 1, so it can only be covered by the full set."""
        p = np.asarray(probabilities, np.float64)
        if len(p) == 0:
            raise ValueError("conformal calibration needs at least one item")
        gold = [
            [int(g)] if np.ndim(g) == 0 else [int(x) for x in g]  # type: ignore[union-attr]
            for g in labels
        ]
        if len(gold) != len(p):
            raise ValueError(f"{len(p)} rows of probabilities but {len(gold)} gold entries")
        scores: list[float] = []
        for row, g in zip(p, gold, strict=True):
            covered = [row[j] if j >= 0 else 0.0 for j in g] or [0.0]
            scores += [1.0 - x for x in covered] if self.cover == "each" else [1.0 - min(covered)]
        self.scores = np.sort(np.asarray(scores))
        return self

    def threshold(self, alpha: float | None = None) -> float:
        """The non-conformity quantile: ``ceil((n + 1)(1 - alpha))``-th smallest score."""
        alpha = self.alpha if alpha is None else _check_alpha(alpha)
        n = len(self.scores)
        if n == 0:
            raise ValueError("fit the conformal calibrator first")
        rank = math.ceil((n + 1) * (1 - alpha))
        return 1.0 if rank > n else float(self.scores[rank - 1])

    def predict_sets(
        self, probabilities: np.ndarray, alpha: float | None = None
    ) -> list[np.ndarray]:
        """Column indices in each row's set (possibly empty), most probable first."""
        q = self.threshold(alpha)
        out = []
        for row in np.asarray(probabilities, np.float64):
            # A small tolerance keeps a label whose probability equals the threshold exactly.
            chosen = np.flatnonzero(1.0 - row <= q + 1e-12)
            out.append(chosen[np.argsort(-row[chosen], kind="stable")])
        return out


def _check_alpha(alpha: float) -> float:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return float(alpha)
