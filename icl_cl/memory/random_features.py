"""Fixed random feature maps: the "buffer layer" that lifts embeddings into a wider space where a
closed-form learner separates classes that a linear one on the embeddings cannot.

- ``relu``: ``max(0, x W)`` with ``W ~ N(0, 1)`` (RanPAC, McDonnell et al. 2023; the buffer layer of
  ACIL / G-ACIL).
- ``rff``: random Fourier features ``sqrt(2/M) cos(x W / sigma + b)`` approximating a Gaussian
  kernel (KLDA, Momeni et al. 2024).

A map is fully defined by its kind, seed and shape: it is regenerated, never trained, so every
statistic built on it stays a sum over examples and learning stays exactly incremental. The
digest of the generated matrix is kept with the store, so a change of random generator between
library versions is detected instead of silently mixing two different maps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np

FeatureKind = Literal["relu", "rff"]

# Rows transformed per block: bounds the float64 temporary at a few tens of MB.
_BLOCK = 2048
# The narrowest map: below it, random features are not worth their cost.
MIN_WIDTH = 256


def feature_width(n_examples: int, max_width: int) -> int:
    """Width of the feature map for a store of ``n_examples``: the smallest power of two at least
    that large, within ``[MIN_WIDTH, max_width]``.

    A ridge on ``M`` features of ``n`` examples has rank at most ``n``, so features beyond the
    example count buy little while the ``M x M`` statistics cost ``M^2`` memory and their solve
    ``M^3``; a small store stays cheap, and a large one gets the full width. The width depends
    only on the example count, so learning sessions one by one or all at once still gives the
    same map and the same predictions.
    """
    width = MIN_WIDTH
    while width < n_examples and width < max_width:
        width *= 2
    return min(width, max_width)


@dataclass(frozen=True)
class RandomFeatures:
    """A fixed random feature map from ``dim`` to ``size`` dimensions.

    Args:
        kind: ``relu`` (RanPAC) or ``rff`` (random Fourier features).
        dim: Input dimension (the embedder's).
        size: Output dimension ``M``.
        seed: Seed of the random projection.
        bandwidth: Kernel width ``sigma`` of ``rff`` (unit input vectors: about 1).
    """

    kind: FeatureKind
    dim: int
    size: int
    seed: int = 0
    bandwidth: float = 1.0

    @cached_property
    def _projection(self) -> tuple[np.ndarray, np.ndarray | None]:
        rng = np.random.default_rng(self.seed)
        weights = rng.standard_normal((self.dim, self.size)).astype(np.float32)
        if self.kind == "relu":
            return weights, None
        weights /= np.float32(self.bandwidth)
        phase = rng.uniform(0.0, 2 * np.pi, self.size).astype(np.float32)
        return weights, phase

    @property
    def name(self) -> str:
        """Identifies the map: kind, shape, seed (and bandwidth for ``rff``)."""
        base = f"{self.kind}-{self.dim}x{self.size}-seed{self.seed}"
        return base if self.kind == "relu" else f"{base}-bw{self.bandwidth:g}"

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the generated projection (and phase): detects a changed generator."""
        weights, phase = self._projection
        h = hashlib.sha256(weights.tobytes())
        if phase is not None:
            h.update(phase.tobytes())
        return h.hexdigest()

    @cached_property
    def _projection64(self) -> tuple[np.ndarray, np.ndarray | None]:
        # Computed in float64: float32 products round differently with the shape of the batch
        # (BLAS kernels), and a row's features must not depend on the rows beside it.
        weights, phase = self._projection
        return weights.astype(np.float64), None if phase is None else phase.astype(np.float64)

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Features of ``vectors (n, dim)`` as float64 ``(n, size)``."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float64)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        weights, phase = self._projection64
        out = np.empty((len(vectors), self.size), dtype=np.float64)
        scale = np.sqrt(2.0 / self.size)
        for lo in range(0, len(vectors), _BLOCK):
            z = out[lo : lo + _BLOCK]
            np.matmul(vectors[lo : lo + _BLOCK], weights, out=z)
            if phase is None:
                np.maximum(z, 0.0, out=z)
            else:  # in place: no temporary the size of the block
                z += phase
                np.cos(z, out=z)
                z *= scale
        return out
