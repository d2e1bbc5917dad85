"""An embedder wrapper that remembers vectors by text, so evaluation embeds each text once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from icl_cl.embedding.base import Embedder, ProgressCallback


class CachedEmbedder:
    """Wraps an :class:`Embedder`; texts seen before are not embedded again."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self._vectors: dict[str, np.ndarray] = {}
        self.misses = 0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode(self, items: Sequence[str], progress: ProgressCallback | None = None) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in items if t not in self._vectors))
        if todo:
            self.misses += len(todo)
            for text, vector in zip(todo, self.inner.encode(todo, progress=progress), strict=True):
                self._vectors[text] = vector
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vectors[t] for t in items]).astype(np.float32, copy=False)
