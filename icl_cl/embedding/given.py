"""An embedder that answers the texts whose vectors are already known from them, and embeds
only the others: for benches and jobs that embedded a corpus once (``.npy`` beside it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from icl_cl.embedding.base import Embedder
from icl_cl.embedding.normalise import unit_rows


class GivenVectors:
    """Wraps an :class:`Embedder`; texts found in ``vectors`` are answered from it, the others
    (label texts, a new session) are embedded by ``inner`` and remembered.

    Args:
        inner: The embedder the vectors came from (its name is the store's embedder).
        vectors: Known vectors by text.
    """

    def __init__(self, inner: Embedder, vectors: Mapping[str, np.ndarray]) -> None:
        self.inner, self._vectors = inner, {text: _unit(v) for text, v in vectors.items()}
        self.name, self.dim = inner.name, inner.dim

    @property
    def reads_images(self) -> bool:
        return self.inner.reads_images

    def encode(self, items: Sequence[Any], progress: Any = None) -> np.ndarray:
        if not items:
            return np.zeros((0, self.dim), np.float32)
        missing = list(dict.fromkeys(x for x in items if x not in self._vectors))
        if missing:
            found = self.inner.encode(missing, progress=progress)
            self._vectors.update(zip(missing, found, strict=True))
        return np.stack([self._vectors[x] for x in items]).astype(np.float32)


def _unit(vector: np.ndarray) -> np.ndarray:
    """A known vector as a unit row (the contract's); one that already is one is kept bit for bit,
    so that its scores equal the inner embedder's."""
    vector = np.asarray(vector, np.float32)
    if abs(float(np.linalg.norm(vector.astype(np.float64))) - 1.0) <= 1e-6:
        return vector
    return unit_rows(vector[None, :])[0]
