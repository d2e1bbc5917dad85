"""Several embedders side by side, as one embedder (e.g. a sentence encoder and an LLM view)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from icl_cl.embedding.base import Embedder, ProgressCallback
from icl_cl.embedding.normalise import unit_rows
from icl_cl.errors import ConfigError
from icl_cl.images import Image

# Items embedded by every part before moving on: bounds memory and keeps the progress bar moving,
# while leaving each part large batches to sort by length.
_CHUNK = 1024


class ConcatEmbedder:
    """Concatenates the vectors of several embedders.

    Each part's rows are L2-normalised, put side by side, and the whole row normalised again, so
    every part weighs the same (each contributes a block of norm ``1/sqrt(len(parts))``).

    Args:
        parts: Two or more embedders, in the order their blocks appear.
    """

    def __init__(self, parts: Sequence[Embedder]) -> None:
        if len(parts) < 2:
            raise ConfigError("a concatenation needs at least two embedders")
        self.parts = list(parts)

    @property
    def name(self) -> str:
        """The parts' names, in order: a store is tied to every one of them."""
        return "concat(" + " + ".join(part.name for part in self.parts) + ")"

    @property
    def reads_images(self) -> bool:
        return all(part.reads_images for part in self.parts)

    @property
    def dim(self) -> int:
        return sum(part.dim for part in self.parts)

    @property
    def blocks(self) -> list[int]:
        """The parts' dimensions, in order (what a
        :class:`~icl_cl.embedding.mean_centring.MeanCentring` of these vectors is given)."""
        return [part.dim for part in self.parts]

    def encode(
        self, items: Sequence[str | Image], progress: ProgressCallback | None = None
    ) -> np.ndarray:
        """Embed ``items`` with every part; unit rows (float32), in the order of ``items``."""
        if len(items) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        for start in range(0, len(items), _CHUNK):
            chunk = items[start : start + _CHUNK]
            out.append(unit_rows(np.hstack([unit_rows(p.encode(chunk)) for p in self.parts])))
            if progress is not None:
                progress(len(chunk))
        return np.ascontiguousarray(np.concatenate(out, axis=0))
