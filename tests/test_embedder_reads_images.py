"""``reads_images`` is part of the :class:`Embedder` contract: every embedder says whether it
takes images, and a wrapper says what the embedder it wraps says."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import numpy as np
import pytest

import icl_cl.embedding
from icl_cl.embedding import Embedder
from icl_cl.embedding.cache import CachedEmbedder
from icl_cl.embedding.concat import ConcatEmbedder
from icl_cl.embedding.given import GivenVectors
from icl_cl.embedding.precomputed import PrecomputedVectors


def _embedder_classes() -> list[type]:
    """The classes of ``icl_cl.embedding`` with the contract's ``encode(items, progress)``."""
    found = {}
    for info in pkgutil.iter_modules(icl_cl.embedding.__path__):
        module = importlib.import_module(f"icl_cl.embedding.{info.name}")
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__ or cls is Embedder:
                continue
            encode = getattr(cls, "encode", None)
            if encode is not None and "progress" in inspect.signature(encode).parameters:
                found[cls.__qualname__] = cls
    return sorted(found.values(), key=lambda cls: cls.__qualname__)


def test_the_classes_are_found() -> None:
    names = {cls.__name__ for cls in _embedder_classes()}
    expected = {"SentenceTransformerEmbedder", "ClipEmbedder", "CentredEmbedder", "GivenVectors"}
    assert expected <= names


@pytest.mark.parametrize("cls", _embedder_classes(), ids=lambda cls: cls.__name__)
def test_every_embedder_says_whether_it_reads_images(cls: type) -> None:
    assert hasattr(cls, "reads_images")


class _Images:
    """An embedder that takes images (its vectors are never asked for here)."""

    name, dim, reads_images = "images", 3, True

    def encode(self, items, progress=None) -> np.ndarray:
        return np.zeros((len(items), self.dim), np.float32)


def test_wrappers_say_what_they_wrap() -> None:
    text_only = PrecomputedVectors(3)
    assert not text_only.reads_images and isinstance(text_only, Embedder)
    assert CachedEmbedder(_Images()).reads_images and not CachedEmbedder(text_only).reads_images
    assert GivenVectors(_Images(), {}).reads_images and not GivenVectors(text_only, {}).reads_images
    # A concatenation takes images only when every part does.
    assert ConcatEmbedder([_Images(), _Images()]).reads_images
    assert not ConcatEmbedder([_Images(), text_only]).reads_images
