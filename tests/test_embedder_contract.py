"""One suite, every embedder: the :class:`~icl_cl.embedding.Embedder` contract (DESIGN.md) run
against each implementation that works offline, with the real packaged models.

The contract: ``(n, dim)`` float32 unit rows in the order of the items, an empty batch is
``(0, dim)``, the progress callback counts each item it embeds once, and a text-only embedder
refuses an image with :class:`DataError` instead of embedding something in its place.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from icl_cl.config import EmbedderConfig
from icl_cl.embedding import Embedder, load_embedder
from icl_cl.embedding.cache import CachedEmbedder
from icl_cl.embedding.concat import ConcatEmbedder
from icl_cl.embedding.given import GivenVectors
from icl_cl.errors import DataError
from icl_cl.images import Image
from tests.tiny_clip import build_tiny_clip

TEXTS = ["a small brown dog", "the stock market fell sharply", "to paint a wall", "a red apple"]
# Rounding differs with the batch a text is padded with (packed or not): order, not bits.
ORDER_TOLERANCE = 1e-4


def _png(rgb: tuple[int, int, int]) -> Image:
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("RGB", (16, 16), rgb).save(buffer, format="PNG")
    return Image.from_bytes(buffer.getvalue())


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return load_embedder(EmbedderConfig())


def _clip(tmp: Path) -> Embedder:
    pytest.importorskip("PIL")
    return load_embedder(EmbedderConfig(model=str(build_tiny_clip(tmp)), batch_size=2))


# Each implementation, built from the real default model where it wraps one.
BUILDERS: dict[str, Callable[[Embedder, Path], Embedder]] = {
    "sentence-transformers": lambda base, tmp: base,
    "cached": lambda base, tmp: CachedEmbedder(base),
    "cached-on-disk": lambda base, tmp: CachedEmbedder(base, tmp / "cache"),
    "concat": lambda base, tmp: ConcatEmbedder([base, CachedEmbedder(base)]),
    "given": lambda base, tmp: GivenVectors(base, {TEXTS[0]: base.encode(TEXTS[:1])[0] * 3.0}),
    "clip": lambda base, tmp: _clip(tmp),
}


@pytest.fixture(params=sorted(BUILDERS), scope="module")
def implementation(
    request: pytest.FixtureRequest, minilm: Embedder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Embedder]:
    yield BUILDERS[request.param](minilm, tmp_path_factory.mktemp(request.param))


def test_it_is_an_embedder(implementation: Embedder) -> None:
    assert isinstance(implementation, Embedder)
    assert isinstance(implementation.name, str) and implementation.name
    assert isinstance(implementation.dim, int) and implementation.dim > 0
    assert isinstance(implementation.reads_images, bool)


def test_unit_float32_rows_in_the_order_of_the_items(implementation: Embedder) -> None:
    vectors = implementation.encode(TEXTS)
    assert vectors.shape == (len(TEXTS), implementation.dim)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    reversed_ = implementation.encode(TEXTS[::-1])
    np.testing.assert_allclose(reversed_[::-1], vectors, atol=ORDER_TOLERANCE)
    alone = implementation.encode(TEXTS[2:3])
    np.testing.assert_allclose(alone[0], vectors[2], atol=ORDER_TOLERANCE)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)  # different texts, different rows


def test_an_empty_batch_is_an_empty_matrix(implementation: Embedder) -> None:
    empty = implementation.encode([])
    assert empty.shape == (0, implementation.dim) and empty.dtype == np.float32


def test_progress_counts_what_is_embedded(implementation: Embedder) -> None:
    """Every item embedded counts once: texts never seen are counted (a cache or known vectors
    embed each distinct one once), and none is counted twice."""
    fresh = [f"{text}, seen once by {implementation.name}" for text in TEXTS]
    done: list[int] = []
    implementation.encode([*fresh, *fresh], progress=done.append)
    assert len(fresh) <= sum(done) <= 2 * len(fresh)


def test_a_cache_counts_only_what_it_embeds(minilm: Embedder) -> None:
    cache, done = CachedEmbedder(minilm), []
    cache.encode(TEXTS[:2], progress=done.append)
    cache.encode(TEXTS, progress=done.append)  # two hits, two misses
    assert sum(done) == len(TEXTS) and cache.missing(TEXTS) == 0
    cache.encode(TEXTS, progress=done.append)
    assert sum(done) == len(TEXTS)


def test_images_are_embedded_or_refused(implementation: Embedder) -> None:
    picture = _png((200, 30, 30))
    if implementation.reads_images:
        vectors = implementation.encode([picture, TEXTS[0]])
        assert vectors.shape == (2, implementation.dim)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    else:
        with pytest.raises(DataError):
            implementation.encode([TEXTS[0], picture])
