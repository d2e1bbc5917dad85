"""Score-to-probability calibration: temperature scaling (multi-class) and Platt scaling (binary).

Both share ``fit(scores, labels)`` / ``transform(scores) -> probabilities``.
"""

from __future__ import annotations

import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large scores."""
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class TemperatureScaling:
    """``p = softmax(s / T)`` over each row's candidates, ``T`` fitted by likelihood.

    ``fit`` takes ``scores (n, k)`` and ``labels (n,)``: the gold candidate's column, or -1 when
    the gold label is not among the candidates (such rows are skipped).
    """

    def __init__(self) -> None:
        self.temperature = 1.0

    def fit(self, scores: np.ndarray, labels: np.ndarray) -> TemperatureScaling:
        from scipy.optimize import minimize_scalar

        scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
        keep = labels >= 0
        if keep.sum() == 0:
            raise ValueError("no row has its gold label among the candidates")
        s, y = scores[keep], labels[keep]

        def nll(log_t: float) -> float:
            z = s / np.exp(log_t)
            z = z - z.max(axis=1, keepdims=True)
            return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).mean())

        self.temperature = float(np.exp(minimize_scalar(nll, bounds=(-10, 10), method="bounded").x))
        return self

    def transform(self, scores: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(scores, np.float64) / self.temperature)


class PlattScaling:
    """``p = sigmoid(a * s + b)`` for independent (multi-label) decisions."""

    def __init__(self) -> None:
        self.a = 1.0
        self.b = 0.0

    def fit(self, scores: np.ndarray, labels: np.ndarray) -> PlattScaling:
        from scipy.optimize import minimize

        s = np.asarray(scores, np.float64).ravel()
        y = np.asarray(labels, np.float64).ravel()
        if len(s) != len(y) or not np.all((y == 0) | (y == 1)):
            raise ValueError("Platt scaling needs one 0/1 label per score")
        # Platt's smoothed targets avoid infinite weights on separable data.
        pos, neg = y.sum(), len(y) - y.sum()
        t = np.where(y == 1, (pos + 1) / (pos + 2), 1 / (neg + 2))

        def nll(params: np.ndarray) -> float:
            z = params[0] * s + params[1]
            return float(np.mean(np.logaddexp(0, z) - t * z))

        self.a, self.b = (
            float(v) for v in minimize(nll, x0=np.array([1.0, 0.0]), method="L-BFGS-B").x
        )
        return self

    def transform(self, scores: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.a * np.asarray(scores, np.float64) + self.b)))
