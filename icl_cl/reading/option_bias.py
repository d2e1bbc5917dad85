"""In-context calibration of LLM option scores: divide out the bias the prompt itself shows.

The three methods share the same correction, ``q(y | x) ∝ p(y | x) / p_bias(y)``; they differ
only in which inputs estimate ``p_bias``:

- contextual (Zhao et al. 2021): content-free inputs such as ``"N/A"``, ``""``, ``"[MASK]"``
  put in place of the input, the rest of the prompt unchanged;
- domain-context (Fei et al. 2023): strings of random in-domain words, about as long as an input;
- batch (Zhou et al. 2024): the real, unlabelled inputs of a batch.

Options are named per row because each input reads its own candidate labels: the bias of a label
is estimated from the rows it appears in.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def _row_probabilities(scores: np.ndarray) -> np.ndarray:
    """Each row's scores as a distribution over its options (``-inf`` options get 0)."""
    s = np.asarray(scores, np.float64)
    live = np.isfinite(s)
    z = np.where(live, s, -np.inf)
    top = np.where(
        live.any(axis=1, keepdims=True),
        np.max(np.where(live, s, -1e300), axis=1, keepdims=True),
        0.0,
    )
    e = np.where(live, np.exp(np.where(live, z - top, 0.0)), 0.0)
    total = e.sum(axis=1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


class OptionBias:
    """``fit`` the bias ``p_bias(option)`` from estimation rows; ``transform`` divides it out.

    Args:
        prior_count: Pseudo-observations of a uniform distribution added to each option's mean.
            0 reproduces the papers' estimate; batch calibration uses 1 so that a label seen in
            a single row is not flattened by its own score.
    """

    def __init__(self, prior_count: float = 0.0) -> None:
        self.prior_count = prior_count
        self.bias: dict[str, float] = {}

    def fit(self, scores: np.ndarray, options: Sequence[Sequence[str]]) -> OptionBias:
        """``scores (n, k)`` log-scores of estimation rows; ``options[i]`` names row i's columns."""
        probs = _row_probabilities(scores)
        total: dict[str, float] = defaultdict(float)
        uniform: dict[str, float] = defaultdict(float)  # sum of 1/k over the rows it is in
        count: dict[str, int] = defaultdict(int)
        for row, names in zip(probs, options, strict=True):
            live = int(np.count_nonzero(row))
            for p, name in zip(row, names, strict=True):
                if p > 0:
                    total[name] += p
                    uniform[name] += 1.0 / live
                    count[name] += 1
        a = self.prior_count
        self.bias = {
            name: (total[name] + a * uniform[name] / count[name]) / (count[name] + a)
            for name in total
        }
        return self

    def transform(self, scores: np.ndarray, options: Sequence[Sequence[str]]) -> np.ndarray:
        """Calibrated log-probabilities over each row's options (``-inf`` stays ``-inf``).
        Options without a bias estimate are left as they are (bias taken as the row's uniform)."""
        probs = _row_probabilities(scores)
        out = np.full(probs.shape, -np.inf)
        for i, (row, names) in enumerate(zip(probs, options, strict=True)):
            live = row > 0
            uniform = 1.0 / max(int(live.sum()), 1)
            bias = np.array([self.bias.get(n, uniform) for n in names])
            q = np.where(live, row / np.maximum(bias, 1e-12), 0.0)
            total = q.sum()
            if total <= 0:
                continue
            with np.errstate(divide="ignore"):
                out[i] = np.log(q / total)
        return out


def domain_strings(texts: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """``n`` strings of random words drawn from ``texts``, each as long (in words) as an average
    text (Fei et al.'s in-domain content-free inputs)."""
    words = [w for t in texts for w in t.split()]
    if not words:
        raise ValueError("domain-context calibration needs stored texts with words")
    length = max(1, round(len(words) / max(len(texts), 1)))
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=length)) for _ in range(n)]
