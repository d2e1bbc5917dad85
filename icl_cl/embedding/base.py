"""The embedder contract."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from icl_cl.images import Image

ProgressCallback = Callable[[int], None]
"""Called with the number of items just embedded; the CLI turns it into a progress bar. A wrapper
that answers some items without embedding them (a cache, known vectors) counts only the others,
each once."""


@runtime_checkable
class Embedder(Protocol):
    """Maps items (texts, and images for a multimodal embedder) to L2-normalised ``float32``
    vectors of shape ``(n, dim)``.

    A text-only embedder given an :class:`~icl_cl.images.Image` raises
    :class:`~icl_cl.errors.DataError`; it never embeds something else in its place.
    """

    @property
    def name(self) -> str:
        """Identifier of the model, stored with the memory so a store is never mixed across models."""
        ...

    @property
    def dim(self) -> int:
        """Vector dimension."""
        ...

    @property
    def reads_images(self) -> bool:
        """Whether it embeds images (a CLIP model); inputs are checked against it before any
        work, so a text-only embedder is never handed an image. A class attribute will do."""
        ...

    def encode(
        self, items: Sequence[str | Image], progress: ProgressCallback | None = None
    ) -> np.ndarray:
        """Embed ``items``; returns an array of shape ``(len(items), dim)``, dtype float32, unit
        rows, in the order of ``items``."""
        ...
