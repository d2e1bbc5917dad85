"""FAISS index over stored unit vectors: example vectors (demonstrations, kNN) and label vectors
(label retrieval)."""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

# HNSW graph degree and search breadth: FAISS defaults that keep recall@20 near 0.99 on
# sentence embeddings at 10^5 vectors.
_HNSW_M = 32
_HNSW_EF_SEARCH = 128


class ExampleIndex:
    """Inner-product index over unit vectors (so scores are cosines).

    Exact (flat) up to ``exact_max`` vectors; beyond that it is rebuilt once as HNSW, which keeps
    search time flat as memory grows. Row ids are insertion order, which is the store's row number.
    """

    def __init__(self, dim: int, exact_max: int) -> None:
        import faiss

        self.dim = dim
        self._exact_max = exact_max
        self._index = faiss.IndexFlatIP(dim)

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    @property
    def kind(self) -> str:
        return "flat" if self.size <= self._exact_max else "hnsw"

    def add(self, vectors: np.ndarray) -> None:
        """Append vectors; their ids continue from the current size."""
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.size + len(vectors) > self._exact_max and isinstance(self._index, faiss.IndexFlat):
            logger.info("index passes %d vectors: switching to HNSW", self._exact_max)
            old = self._index.reconstruct_n(0, self.size) if self.size else vectors[:0]
            hnsw = faiss.IndexHNSWFlat(self.dim, _HNSW_M, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efSearch = _HNSW_EF_SEARCH
            hnsw.add(old)
            self._index = hnsw
        self._index.add(vectors)

    def vectors(self, rows: list[int]) -> np.ndarray:
        """Stored vectors by row id."""
        if not rows:
            return np.zeros((0, self.dim), np.float32)
        return np.vstack([self._index.reconstruct(int(r)) for r in rows])

    def vectors_all(self) -> np.ndarray:
        """Every stored vector, in row order."""
        if self.size == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._index.reconstruct_n(0, self.size)

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``n`` neighbours per query: ``(similarities, rows)``; missing slots have row -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = max(1, min(n, self.size))
        return self._index.search(queries, n)
