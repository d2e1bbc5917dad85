"""FAISS index over stored unit vectors: example vectors (demonstrations, kNN) and label vectors
(label retrieval).

Exact search up to a limit, HNSW beyond it. The HNSW graph is saved next to the store after each
session, so that opening a large store reads it instead of building it again; the saved index is
a cache of the committed vectors, checked against them on load. With CUDA GPUs (``faiss-gpu``),
the exact index lives on them at any size: FAISS has no GPU HNSW, and brute force on a GPU is
fast well past the CPU's limit.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from icl_cl.memory.store import write_atomic

logger = logging.getLogger(__name__)

# HNSW graph degree and search breadth: FAISS defaults that keep recall@20 near 0.99 on
# sentence embeddings at 10^5 vectors.
_HNSW_M = 32
_HNSW_EF_SEARCH = 128

EXAMPLES_FILE = "examples.hnsw"
"""The saved HNSW index of example vectors, in the store directory (above the exact limit)."""
LABELS_FILE = "labels.hnsw"
"""The saved HNSW index of label vectors, in the store directory (above the exact limit)."""

# A saved index is this tag, the SHA-256 of FAISS's serialization, then that serialization:
# FAISS does not check what it reads, and a flipped byte in a graph or its vectors would give
# other neighbours without an error.
_TAG = b"icl-cl hnsw sha256\n"
_DIGEST = 32


class UncheckedIndexError(ValueError):
    """A saved index without a checksum: written before saved indexes had one."""


def saved_index_bytes(file: Path) -> memoryview:
    """FAISS's serialization saved in ``file``, its SHA-256 checked.

    Raises:
        OSError: ``file`` cannot be read.
        UncheckedIndexError: It was written without a checksum (by an older version).
        ValueError: It is damaged.
    """
    data = memoryview(file.read_bytes())
    head = len(_TAG) + _DIGEST
    if bytes(data[: len(_TAG)]) != _TAG:
        raise UncheckedIndexError("saved without a checksum (by an older version)")
    if hashlib.sha256(data[head:]).digest() != bytes(data[len(_TAG) : head]):
        raise ValueError("does not match its checksum (file damaged)")
    return data[head:]


def gpu_count() -> int:
    """CUDA GPUs FAISS can use (0 with ``faiss-cpu``)."""
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


class ExampleIndex:
    """Inner-product index over unit vectors (so scores are cosines).

    Exact (flat) up to ``exact_max`` vectors; beyond that it is rebuilt once as HNSW, which keeps
    search time flat as memory grows. Row ids are insertion order, which is the store's row
    number. On GPUs (``use_gpu``, default: when FAISS sees one) it stays exact, on every GPU.
    """

    def __init__(self, dim: int, exact_max: int, *, use_gpu: bool | None = None) -> None:
        import faiss

        self.dim = dim
        self._exact_max = exact_max
        self._gpu = gpu_count() > 0 if use_gpu is None else use_gpu
        self._index = faiss.IndexFlatIP(dim)
        if self._gpu:
            self._index = faiss.index_cpu_to_all_gpus(self._index)

    @classmethod
    def restore(cls, file: Path, dim: int, exact_max: int, vectors: np.ndarray) -> ExampleIndex:
        """The index of ``vectors`` (all committed rows, in order): read from ``file`` when it
        holds an HNSW index of a prefix of them (the rows after it are added), else built."""
        index = cls(dim, exact_max)
        if not index._gpu and len(vectors) > exact_max and file.exists():
            saved = index._read(file, vectors)
            if saved is not None:
                logger.debug("read the index of %d vectors from %s", saved.ntotal, file)
                index._index = saved
                index._index.add(np.ascontiguousarray(vectors[saved.ntotal :], np.float32))
                return index
        index.add(vectors)
        return index

    def _read(self, file: Path, vectors: np.ndarray) -> object | None:
        """The saved HNSW index if it indexes a prefix of ``vectors``; ``None`` if not."""
        import faiss

        try:
            saved = faiss.deserialize_index(np.frombuffer(saved_index_bytes(file), np.uint8))
        except (OSError, ValueError, RuntimeError) as exc:
            logger.warning("%s: unreadable, rebuilding the index: %s", file, exc)
            return None
        n = int(saved.ntotal)
        if not isinstance(saved, faiss.IndexHNSWFlat) or saved.d != self.dim or n > len(vectors):
            logger.warning("%s: does not match the store, rebuilding the index", file)
            return None
        if n and not np.array_equal(saved.reconstruct(n - 1), vectors[n - 1]):
            logger.warning("%s: holds other vectors than the store, rebuilding the index", file)
            return None
        saved.hnsw.efSearch = _HNSW_EF_SEARCH
        return saved

    def save(self, file: Path) -> None:
        """Write the index to ``file`` (atomically) when it is an HNSW graph; an exact index is
        cheaper to rebuild than to read, and a GPU one is rebuilt on open."""
        import faiss

        if isinstance(self._index, faiss.IndexHNSWFlat):
            data = faiss.serialize_index(self._index).tobytes()
            write_atomic(file, _TAG + hashlib.sha256(data).digest() + data)

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    @property
    def kind(self) -> str:
        if self._gpu:
            return "flat-gpu"
        return "flat" if self.size <= self._exact_max else "hnsw"

    def add(self, vectors: np.ndarray) -> None:
        """Append vectors; their ids continue from the current size."""
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if (
            not self._gpu
            and self.size + len(vectors) > self._exact_max
            and isinstance(self._index, faiss.IndexFlat)
        ):
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
