"""Mean centring: a fixed transform of embedder vectors, fitted once and then frozen.

The hidden states of an LLM share a large common direction; removing the mean of the first
learned examples makes the views' differences visible to the ECL. To keep learning exactly
incremental (N sessions learned one by one equal their union), the mean is fitted once, on the
first session, then stored with the memory and never refitted: every later vector, learned or
queried, goes through the same transform.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from icl_cl.embedding.normalise import unit_rows
from icl_cl.errors import ConfigError

KIND = "mean_centring"


class MeanCentring:
    """``apply(v) = (v - mean) / ||v - mean||``, with ``mean`` fitted once and then frozen.

    Args:
        mean: The mean to subtract (float64); ``None`` for a transform still to be fitted.
    """

    def __init__(self, mean: np.ndarray | None = None) -> None:
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64).ravel()

    @property
    def fitted(self) -> bool:
        return self.mean is not None

    def fit(self, vectors: np.ndarray) -> MeanCentring:
        """Set the mean from ``vectors`` (rows); refitting a fitted transform is an error."""
        if self.fitted:
            raise ConfigError("the centring is frozen: it was fitted already")
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ConfigError(f"fit needs a non-empty (n, d) array, got shape {vectors.shape}")
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
        return unit_rows(vectors.astype(np.float64) - self.mean)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; floats round-trip exactly."""
        if self.mean is None:
            raise ConfigError("an unfitted centring has nothing to save")
        return {"kind": KIND, "mean": [float(x) for x in self.mean]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeanCentring:
        """The transform :meth:`to_dict` saved."""
        if data.get("kind") != KIND or not isinstance(data.get("mean"), list):
            raise ConfigError(f"not a saved mean centring: {sorted(data)}")
        return cls(np.array(data["mean"], dtype=np.float64))
