"""GivenVectors: known texts answered from their vectors, the others embedded by the model."""

from __future__ import annotations

import numpy as np

from icl_cl.embedding.given import GivenVectors


def test_known_texts_come_from_their_vectors_and_the_others_from_the_model(embedder):
    dog = embedder.encode(["a dog"])[0]
    known = {"a cat": np.full(embedder.dim, 0.5, np.float32), "a dog": dog}
    given = GivenVectors(embedder, known)
    assert given.name == embedder.name and given.dim == embedder.dim
    out = given.encode(["a cat", "a violin", "a cat", "a dog"])
    # Unit rows, as the embedder contract says: a unit vector is kept bit for bit.
    unit = known["a cat"] / np.linalg.norm(known["a cat"])
    np.testing.assert_allclose(out[0], unit, rtol=1e-6)
    np.testing.assert_array_equal(out[2], out[0])
    np.testing.assert_array_equal(out[3], dog)
    np.testing.assert_allclose(out[1], embedder.encode(["a violin"])[0], atol=1e-6)
    assert given.encode([]).shape == (0, embedder.dim)
