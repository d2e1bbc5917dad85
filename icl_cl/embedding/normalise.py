"""Row normalisation shared by the embedders and the transforms that follow them."""

from __future__ import annotations

import numpy as np


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (all-zero rows stay zero).

    The norm is computed in float64, so a float64 input (a centred vector) loses nothing before
    the final cast.
    """
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, np.finfo(np.float64).tiny)).astype(np.float32)
