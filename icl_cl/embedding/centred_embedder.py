"""An embedder whose vectors pass through a frozen mean centring kept in the store.

The centring (:class:`~icl_cl.embedding.mean_centring.MeanCentring`) is fitted on the first vectors
the store's embedder encodes, which are those of the first session learned, and stored at once;
from then on every vector, learned or queried, goes through the same transform. So sessions
learned one by one still equal their union, and a prediction only reads the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from icl_cl.embedding.base import Embedder, ProgressCallback
from icl_cl.embedding.mean_centring import MeanCentring
from icl_cl.images import Image
from icl_cl.memory.store import Store

if TYPE_CHECKING:
    from icl_cl.config import EmbedderConfig

# Where the store keeps the centring among its fitted rows.
CENTRING_KEY = "embedding:centring"


class CentredEmbedder:
    """``inner``'s vectors, centred by the store's frozen mean.

    Args:
        inner: The embedder (an LLM view, alone or concatenated).
        store: The store that keeps the centring (read on open, written once by the first
            session learned).
    """

    def __init__(self, inner: Embedder, store: Store) -> None:
        self.inner = inner
        self._store = store
        stored = store.fitted(CENTRING_KEY)
        blocks = getattr(inner, "blocks", None)
        self.centring = (
            MeanCentring.from_dict(stored[0]) if stored is not None else MeanCentring(blocks)
        )

    @property
    def name(self) -> str:
        # The inner name: whether a store centres is part of its stored config, never mixed.
        return self.inner.name

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def reads_images(self) -> bool:
        return self.inner.reads_images

    def encode(
        self, items: Sequence[str | Image], progress: ProgressCallback | None = None
    ) -> np.ndarray:
        vectors = self.inner.encode(items, progress=progress)
        if len(vectors) == 0:
            return vectors
        if not self.centring.fitted:
            # The first vectors of the store: the first session's examples.
            self.centring.fit(vectors)
            self._store.save_fitted(CENTRING_KEY, self.centring.to_dict(), 0)
        return np.ascontiguousarray(self.centring.apply(vectors), dtype=np.float32)


def centred_for_store(embedder: Embedder, config: EmbedderConfig, store: Store) -> Embedder:
    """``embedder`` centred by ``store``'s frozen mean when its config asks for it (an LLM view
    with ``centre``), else ``embedder`` itself."""
    view = config.llm_view
    return CentredEmbedder(embedder, store) if view is not None and view.centre else embedder
