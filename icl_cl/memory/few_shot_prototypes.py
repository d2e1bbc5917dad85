"""Prototype calibration for few-shot labels (TEEN, Wang et al., NeurIPS 2023).

A label learned from a handful of examples has a noisy class mean. TEEN pulls it towards the
means of similar well-populated labels:
``mu'_c = a mu_c + (1 - a) sum_b softmax_b(tau cos(mu_c, mu_b)) mu_b``, over labels ``b`` with
more than ``max_examples`` examples. It is a pure function of the running sums and counts,
computed when a scorer is built, so learning stays exactly incremental.
"""

from __future__ import annotations

import numpy as np

from icl_cl.memory.statistics import RunningStatistics


def calibrated_means(
    stats: RunningStatistics, max_examples: int, alpha: float, tau: float
) -> np.ndarray:
    """Class means with those of few-shot labels calibrated towards populated ones.

    Args:
        stats: The running statistics (counts and sums per label).
        max_examples: Labels with 1 to this many examples are calibrated (0: none is).
        alpha: Weight kept on a few-shot label's own mean (1: no calibration).
        tau: Softmax temperature over cosine similarities to the populated labels' means.

    Returns:
        ``(n_labels, dim)`` float64 means; rows of labels with no example stay zero, and the
        means of labels with more than ``max_examples`` examples are unchanged.
    """
    means = stats.means()
    counts = stats.counts
    few = (counts > 0) & (counts <= max_examples)
    populated = counts > max_examples
    if alpha >= 1 or not few.any() or not populated.any():
        return means
    norms = np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    unit = means / norms
    logits = tau * (unit[few] @ unit[populated].T)
    logits -= logits.max(axis=1, keepdims=True)  # a stable softmax
    weights = np.exp(logits)
    weights /= weights.sum(axis=1, keepdims=True)
    means[few] = alpha * means[few] + (1 - alpha) * (weights @ means[populated])
    return means


__all__ = ["calibrated_means"]
