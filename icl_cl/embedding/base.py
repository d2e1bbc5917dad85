"""The embedder contract."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

ProgressCallback = Callable[[int], None]
"""Called with the number of items just finished; the CLI turns it into a progress bar."""


@runtime_checkable
class Embedder(Protocol):
    """Maps items to L2-normalised ``float32`` vectors of shape ``(n, dim)``."""

    @property
    def name(self) -> str:
        """Identifier of the model, stored with the memory so a store is never mixed across models."""
        ...

    @property
    def dim(self) -> int:
        """Vector dimension."""
        ...

    def encode(self, items: Sequence[str], progress: ProgressCallback | None = None) -> np.ndarray:
        """Embed ``items``; returns an array of shape ``(len(items), dim)``, dtype float32, unit rows."""
        ...
