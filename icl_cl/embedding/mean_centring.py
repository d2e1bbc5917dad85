"""Mean centring: a fixed transform of embedder vectors, fitted once and then frozen.

The hidden states of an LLM share a large common direction (their unit vectors have cosines near
0.9 with each other); removing the mean of the first learned examples leaves the part that tells
texts apart. To keep learning exactly incremental (N sessions learned one by one equal their
union), the mean is fitted once, on the first session, then stored with the memory and never
refitted: every later vector, learned or queried, goes through the same transform, row by row.

For a concatenation of embedders (:class:`~icl_cl.embedding.concat.ConcatEmbedder`), each block
is brought back to unit norm after centring, before the whole row is: without it, the block
that had the larger common direction (the LLM's) would shrink most and count least.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from icl_cl.embedding.normalise import unit_rows
from icl_cl.errors import ConfigError

KIND = "mean_centring"


class MeanCentring:
    """``apply(v)``: ``v - mean``, each block to unit norm, the whole row to unit norm.

    Args:
        blocks: Dimensions of the blocks of a concatenated vector, in order (for a
            :class:`~icl_cl.embedding.concat.ConcatEmbedder`, its ``blocks``); ``None``: one block.
        mean: The mean to subtract (float64); ``None`` for a transform still to be fitted.
    """

    def __init__(self, blocks: Sequence[int] | None = None, mean: np.ndarray | None = None) -> None:
        self.blocks = None if blocks is None else [int(b) for b in blocks]
        if self.blocks is not None and (not self.blocks or min(self.blocks) < 1):
            raise ConfigError(f"blocks must be positive dimensions, got {self.blocks}")
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64).ravel()
        if self.mean is not None:
            self._check_dim(len(self.mean))

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def _check_dim(self, dim: int) -> None:
        if self.blocks is not None and sum(self.blocks) != dim:
            raise ConfigError(f"blocks {self.blocks} do not add up to dimension {dim}")

    def fit(self, vectors: np.ndarray) -> MeanCentring:
        """Set the mean from ``vectors`` (rows); refitting a fitted transform is an error."""
        if self.fitted:
            raise ConfigError("the centring is frozen: it was fitted already")
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ConfigError(f"fit needs a non-empty (n, d) array, got shape {vectors.shape}")
        self._check_dim(vectors.shape[1])
        self.mean = vectors.astype(np.float64).mean(axis=0)
        return self

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Centred unit rows (float32) of ``vectors``; needs a fitted transform."""
        if self.mean is None:
            raise ConfigError("the centring is not fitted")
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != len(self.mean):
            raise ConfigError(
                f"expected vectors of dimension {len(self.mean)}, got shape {vectors.shape}"
            )
        centred = vectors.astype(np.float64) - self.mean
        if self.blocks is None:
            return unit_rows(centred)
        ends = np.cumsum(self.blocks)[:-1]
        return unit_rows(np.hstack([unit_rows(b) for b in np.split(centred, ends, axis=1)]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; floats round-trip exactly."""
        if self.mean is None:
            raise ConfigError("an unfitted centring has nothing to save")
        return {"kind": KIND, "blocks": self.blocks, "mean": [float(x) for x in self.mean]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeanCentring:
        """The transform :meth:`to_dict` saved."""
        if data.get("kind") != KIND or not isinstance(data.get("mean"), list):
            raise ConfigError(f"not a saved mean centring: {sorted(data)}")
        return cls(data.get("blocks"), np.array(data["mean"], dtype=np.float64))
