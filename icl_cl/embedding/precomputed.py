"""The embedder of a store whose vectors come with the data, for users with their own embeddings
(scikit-learn's ``embedder="precomputed"``): it names the vector space and embeds no input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from icl_cl.errors import DataError


class PrecomputedVectors:
    """Stands in for a model in a store of given vectors: its name keeps other vectors out of
    the store, and it embeds nothing. Queries arrive as vectors
    (``ContinualClassifier.predict_vectors``); a session is learned through
    :class:`~icl_cl.embedding.given.GivenVectors` over this embedder, which answers its rows
    (and label texts) from the vectors it is given, so any other input is refused here.

    Args:
        dim: Width of the vectors.
    """

    reads_images = False

    def __init__(self, dim: int) -> None:
        self.name, self.dim = f"precomputed-{dim}", dim

    def encode(self, items: Sequence[Any], progress: Any = None) -> np.ndarray:
        if len(items):
            raise DataError(
                f"the store holds precomputed vectors ({self.name}) and embeds no input: "
                "give vectors (predict_vectors)",
                item="0",
            )
        return np.zeros((0, self.dim), np.float32)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as float32 rows of length 1, as every embedder gives them (the ECL compares
    directions); a zero row, which has none, stays zero."""
    vectors = np.asarray(vectors, np.float64)
    # Scaled by the largest entry first, so that the squares of huge or tiny values neither
    # overflow nor vanish.
    peak = np.abs(vectors).max(axis=1, keepdims=True, initial=0.0)
    vectors = vectors / np.where(peak > 0, peak, 1.0)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)
