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
    the gold label is not among the candidates.

    Args:
        exponent: Also fit an exponent ``g`` on each candidate's gap to the row's top score:
            logits ``-(s_max - s_j) ** g / T``. ``g = 1`` is plain temperature scaling (softmax
            ignores the shift); ``g < 1`` lets close runners-up share more mass while distant
            ones still get little, which a single temperature cannot do (measured on WordNet
            supersenses: ECE 0.052 -> 0.039, see README).
        outside: Also model "the gold label is not among these candidates" as one more option
            with logit ``c + beta * logsumexp(logits)``; the fit picks how much the missing
            mass depends on how spread the candidates are. Candidate probabilities then sum to
            less than 1 by the mass the held-out data put outside the top k, instead of being
            overconfident by it. Without it, rows whose gold is outside are skipped.
    """

    def __init__(self, outside: bool = False, exponent: bool = False) -> None:
        self.outside = outside
        self.exponent = exponent
        self.temperature = 1.0
        self.power = 1.0
        self.outside_logit = -np.inf
        self.outside_slope = 0.0

    def _logits(self, scores: np.ndarray, params: dict[str, float]) -> np.ndarray:
        gap = np.maximum(scores.max(axis=1, keepdims=True) - scores, 0.0)
        z = -(gap ** params["power"]) / params["temperature"]
        if not self.outside:
            return z
        lse = np.log(np.exp(z).sum(axis=1, keepdims=True))  # the top logit is 0: no overflow
        return np.concatenate([z, params["outside_logit"] + params["outside_slope"] * lse], 1)

    def _unpack(self, x: np.ndarray) -> dict[str, float]:
        params = {"temperature": float(np.exp(x[0])), "power": 1.0}
        i = 1
        if self.exponent:
            params["power"] = float(np.exp(x[i]))
            i += 1
        if self.outside:
            params["outside_logit"], params["outside_slope"] = float(x[i]), float(x[i + 1])
        return params

    def fit(self, scores: np.ndarray, labels: np.ndarray) -> TemperatureScaling:
        from scipy.optimize import minimize

        scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
        scores = np.where(np.isfinite(scores), scores, -1e9)
        if (labels >= 0).sum() == 0:
            raise ValueError("no row has its gold label among the candidates")
        keep = np.ones(len(labels), dtype=bool) if self.outside else labels >= 0
        s = scores[keep]
        # The outside option is the extra last column.
        y = np.where(labels[keep] >= 0, labels[keep], s.shape[1])

        def nll(x: np.ndarray) -> float:
            z = self._logits(s, self._unpack(x))
            z = z - z.max(axis=1, keepdims=True)
            return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).mean())

        x0 = [float(np.log(np.median(s.max(axis=1) - s.mean(axis=1)) + 1e-9))]
        bounds: list[tuple[float | None, float | None]] = [(-20.0, 20.0)]
        if self.exponent:
            x0, bounds = [*x0, 0.0], [*bounds, (-3.0, 1.0)]
        if self.outside:
            x0, bounds = [*x0, -3.0, 1.0], [*bounds, (None, None), (-5.0, 5.0)]
        fitted = self._unpack(minimize(nll, x0=np.array(x0), bounds=bounds, method="L-BFGS-B").x)
        self.temperature, self.power = fitted["temperature"], fitted["power"]
        if self.outside:
            self.outside_logit, self.outside_slope = (
                fitted["outside_logit"],
                fitted["outside_slope"],
            )
        return self

    def transform(self, scores: np.ndarray) -> np.ndarray:
        """Candidate probabilities ``(n, k)``; with ``outside`` rows sum to less than 1."""
        s = np.asarray(scores, np.float64)
        s = np.where(np.isfinite(s), s, -1e9)
        return softmax(self._logits(s, self.to_dict()))[:, : s.shape[1]]  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, float | bool]:
        return {
            "outside": self.outside,
            "exponent": self.exponent,
            "temperature": self.temperature,
            "power": self.power,
            "outside_logit": self.outside_logit,
            "outside_slope": self.outside_slope,
        }


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
        z = self.a * np.asarray(scores, np.float64) + self.b
        return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))

    def to_dict(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b}
