"""The CLIP embedder: a tiny random-weight CLIP, built and loaded by path as a user would, embeds
texts and images into one space; the cache keys images by their bytes; real Fashion-MNIST
images go through it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from icl_cl.config import EmbedderConfig
from icl_cl.embedding import (
    ClipEmbedder,
    SentenceTransformerEmbedder,
    is_clip_model,
    load_embedder,
)
from icl_cl.embedding.cache import CachedEmbedder
from icl_cl.errors import DataError
from icl_cl.images import Image, load_image
from tests.fashion_mnist import CLASSES, FashionMnistUnavailableError, load_pictures
from tests.tiny_clip import PROJECTION_DIM, build_tiny_clip


def _png(color: tuple[int, int, int], size: tuple[int, int] = (20, 20), dot: int = 0) -> Image:
    from PIL import Image as PILImage

    img = PILImage.new("RGB", size, color)
    img.putpixel((dot, dot), (255 - color[0], 255 - color[1], 255 - color[2]))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return load_image(buffer.getvalue())


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def clip(clip_path: Path) -> ClipEmbedder:
    embedder = load_embedder(EmbedderConfig(model=str(clip_path), batch_size=4))
    assert isinstance(embedder, ClipEmbedder)
    return embedder


@pytest.fixture(scope="module")
def images() -> list[Image]:
    return [
        _png((200, 30, 30)),
        _png((30, 200, 30)),
        _png((30, 30, 200), (40, 24)),
        _png((9, 9, 9)),
    ]


def _unit_rows(vectors: np.ndarray) -> None:
    assert vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_load_embedder_recognises_clip_models(clip_path: Path, tmp_path: Path) -> None:
    assert is_clip_model(str(clip_path))
    assert is_clip_model(str(clip_path.parent / "hf"))  # a plain Hugging Face CLIP folder
    # The layout of older sentence-transformers CLIP saves (clip-ViT-B-32): a CLIPModel module.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    modules = [{"idx": 0, "name": "0", "path": "0_CLIPModel", "type": "x.models.CLIPModel"}]
    (legacy / "modules.json").write_text(json.dumps(modules))
    assert is_clip_model(str(legacy))
    # Judged by name when nothing is on disk; the multilingual variant is a text-only student.
    assert is_clip_model("clip-ViT-B-32")
    assert is_clip_model("openai/clip-vit-base-patch32")
    assert not is_clip_model("sentence-transformers/clip-ViT-B-32-multilingual-v1")
    assert not is_clip_model("all-MiniLM-L6-v2")
    text = load_embedder(EmbedderConfig())  # the packaged MiniLM, judged from its files
    assert type(text) is SentenceTransformerEmbedder


def test_texts_and_images_share_one_space(clip: ClipEmbedder, images: list[Image]) -> None:
    texts = clip.encode(["a red square", "Ankle boot", "T-shirt/top"])
    pictures = clip.encode(images)
    assert clip.dim == PROJECTION_DIM
    assert texts.shape == (3, PROJECTION_DIM)
    assert pictures.shape == (len(images), PROJECTION_DIM)
    _unit_rows(texts)
    _unit_rows(pictures)
    assert clip.encode([]).shape == (0, PROJECTION_DIM)
    assert clip.name.endswith("tiny-clip")


def test_an_image_gets_the_same_vector_whatever_its_batch_mates(
    clip: ClipEmbedder, images: list[Image]
) -> None:
    alone = clip.encode([images[2]])[0]
    # batch_size is 4: this list spans two batches, with the image in each position class.
    crowd = clip.encode([images[0], images[1], images[2], "mate", images[3], images[2]])
    assert np.allclose(crowd[2], alone, atol=1e-5)
    assert np.allclose(crowd[5], alone, atol=1e-5)
    # The same bytes loaded twice are the same image.
    again = load_image(images[2].data)
    assert np.allclose(clip.encode([again])[0], alone, atol=1e-5)


def test_different_inputs_get_different_vectors(clip: ClipEmbedder, images: list[Image]) -> None:
    pictures = clip.encode(images)
    texts = clip.encode(["Sneaker", "Sandal", "Bag"])
    for vectors in (pictures, texts):
        sims = vectors @ vectors.T
        off_diagonal = sims[~np.eye(len(vectors), dtype=bool)]
        assert off_diagonal.max() < 1 - 1e-4


def test_mixed_list_keeps_its_order(clip: ClipEmbedder, images: list[Image]) -> None:
    items: list[str | Image] = ["Coat", images[0], "Dress", images[1], images[2], "Shirt"]
    seen: list[int] = []
    mixed = clip.encode(items, progress=seen.append)
    assert sum(seen) == len(items)
    text_rows = clip.encode(["Coat", "Dress", "Shirt"])
    image_rows = clip.encode(images[:3])
    expected = np.stack(
        [text_rows[0], image_rows[0], text_rows[1], image_rows[1], image_rows[2], text_rows[2]]
    )
    assert np.allclose(mixed, expected, atol=1e-5)


def test_a_text_naming_an_image_file_is_embedded_as_text(
    clip: ClipEmbedder, images: list[Image], tmp_path: Path
) -> None:
    # sentence-transformers would open such a string as an image; an item's type decides here.
    path = tmp_path / "photo.png"
    path.write_bytes(images[0].data)
    as_text, as_image = clip.encode([str(path), load_image(str(path))])
    assert not np.allclose(as_text, as_image, atol=1e-3)


def test_other_item_types_are_refused(clip: ClipEmbedder) -> None:
    with pytest.raises(DataError, match="must be a text or an Image"):
        clip.encode(["fine", b"raw bytes"])  # type: ignore[list-item]


def test_text_embedder_refuses_images(images: list[Image]) -> None:
    text = load_embedder(EmbedderConfig())
    with pytest.raises(DataError, match="text-only") as caught:
        text.encode(["a text", images[0]])
    assert caught.value.item == "#1"
    with pytest.raises(DataError, match="text-only"):
        CachedEmbedder(text).encode([images[1]])


def test_cache_keys_images_by_their_bytes_and_survives_a_reload(
    clip: ClipEmbedder, images: list[Image], tmp_path: Path
) -> None:
    cached = CachedEmbedder(clip, folder=tmp_path)
    first = cached.encode([images[0], "Trouser", images[1], images[0]])
    assert cached.misses == 3  # the repeated image is embedded once
    assert np.allclose(first, clip.encode([images[0], "Trouser", images[1], images[0]]), atol=1e-5)
    # A new Image object from the same bytes is a hit.
    second = cached.encode([load_image(images[1].data), images[0]])
    assert cached.misses == 3
    assert np.array_equal(second, first[[2, 0]])
    assert cached.missing([images[0], images[2], "Trouser"]) == 1
    # A text that spells an image's key is a text, not that image.
    key_as_text = cached.encode([images[0].key])
    assert cached.misses == 4
    assert not np.allclose(key_as_text[0], first[0], atol=1e-3)

    reopened = CachedEmbedder(clip, folder=tmp_path)
    again = reopened.encode([images[0], "Trouser", images[1], images[0].key])
    assert reopened.misses == 0
    assert np.array_equal(again[:3], first[:3])
    assert np.array_equal(again[3], key_as_text[0])


def test_cache_files_for_texts_keep_their_layout(clip: ClipEmbedder, tmp_path: Path) -> None:
    cached = CachedEmbedder(clip, folder=tmp_path)
    cached.encode(["Bag", "Sneaker"])
    (file,) = tmp_path.glob("*/chunk-*.npz")
    with np.load(file, allow_pickle=False) as data:
        assert set(data.files) == {"vectors", "texts"}
        assert json.loads(data["texts"].tobytes().decode("utf-8")) == ["Bag", "Sneaker"]


@pytest.fixture(scope="module")
def fashion() -> list:
    try:
        return load_pictures(per_class=2)
    except FashionMnistUnavailableError as exc:  # no apt-get or no package mirror here
        pytest.skip(str(exc))


def test_fashion_mnist_images_load_and_embed(clip: ClipEmbedder, fashion: list) -> None:
    assert [p.label for p in fashion] == [name for name in CLASSES for _ in range(2)]
    # Known answer: the first test image of Fashion-MNIST is an ankle boot.
    assert any(p.index == 0 and p.label == "Ankle boot" for p in fashion)
    pictures = [load_image(p.png, item=f"{p.label}#{p.index}") for p in fashion]
    assert all(img.size == (28, 28) and img.format == "PNG" for img in pictures)
    assert len({img.key for img in pictures}) == len(pictures)
    # Class names and pictures in one call: the zero-shot setting, where labels are texts.
    vectors = clip.encode([*CLASSES, *pictures])
    assert vectors.shape == (len(CLASSES) + len(pictures), PROJECTION_DIM)
    _unit_rows(vectors)
    image_vectors = vectors[len(CLASSES) :]
    sims = image_vectors @ image_vectors.T
    assert sims[~np.eye(len(pictures), dtype=bool)].max() < 1 - 1e-6
