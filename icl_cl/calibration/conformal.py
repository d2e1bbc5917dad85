"""Split-conformal label sets with a stated coverage ``1 - alpha``."""

from __future__ import annotations

import math

import numpy as np


class SplitConformal:
    """Least-ambiguous set-valued classifier (LAC): the set holds every label whose probability is
    at least ``1 - q``, where ``q`` is the conformal quantile of ``1 - p(gold)`` on calibration data.

    With exchangeable calibration and test data, ``P(gold in set) >= 1 - alpha``.
    """

    def __init__(self, alpha: float = 0.1) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha = alpha
        self.threshold = 1.0

    def fit(self, probabilities: np.ndarray, labels: np.ndarray) -> SplitConformal:
        """``probabilities (n, k)``; ``labels (n,)`` gold columns, -1 when gold is not a candidate
        (its non-conformity is then 1: the gold label can only be covered by abstaining)."""
        p = np.asarray(probabilities, np.float64)
        y = np.asarray(labels)
        if len(p) == 0:
            raise ValueError("conformal calibration needs at least one item")
        gold_p = np.where(y >= 0, p[np.arange(len(y)), np.clip(y, 0, None)], 0.0)
        scores = 1.0 - gold_p
        n = len(scores)
        rank = math.ceil((n + 1) * (1 - self.alpha))
        self.threshold = 1.0 if rank > n else float(np.sort(scores)[rank - 1])
        return self

    def predict_sets(self, probabilities: np.ndarray) -> list[np.ndarray]:
        """Column indices in each row's set (possibly empty), most probable first."""
        p = np.asarray(probabilities, np.float64)
        out = []
        for row in p:
            chosen = np.flatnonzero(1.0 - row <= self.threshold)
            out.append(chosen[np.argsort(-row[chosen], kind="stable")])
        return out
