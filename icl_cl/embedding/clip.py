"""CLIP-style embedder: texts through the text tower, images through the image tower, into one
shared space (via sentence-transformers).

Because labels are embedded by their name or description in the same space as images, a label
has a usable prototype before any image of it was seen (zero-shot candidates, as in CLIP and
CHiLS); image examples then refine its statistics like any other example.

Configure it by naming a CLIP model in ``EmbedderConfig.model``: ``clip-ViT-B-32`` (downloaded
by sentence-transformers once), a Hugging Face CLIP repository such as
``openai/clip-vit-base-patch32``, or a local directory holding either.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.embedding.base import ProgressCallback
from icl_cl.embedding.sentence_transformers import SentenceTransformerEmbedder
from icl_cl.errors import ConfigError, DataError
from icl_cl.images import Image

logger = logging.getLogger(__name__)

# Items per call into sentence-transformers; for images this also bounds how many decoded
# pictures are held in memory at once.
_CHUNK = 256

# Hub names that are CLIP models when nothing about them is on disk yet: sentence-transformers'
# clip-ViT-*, OpenAI's clip-vit-*, LAION's CLIP-ViT-*. The multilingual clip-ViT-B-32 variant is
# a text-only student model (it has no image tower), so it is not one.
_CLIP_NAME = re.compile(r"^clip-vit", re.IGNORECASE)
_CLIP_MODEL_TYPES = {"clip"}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_clip_config(path: Path) -> bool:
    config = _read_json(path / "config.json")
    return isinstance(config, dict) and config.get("model_type") in _CLIP_MODEL_TYPES


def _dir_is_clip(folder: Path) -> bool:
    """A sentence-transformers folder whose first module is a CLIP model, or a plain Hugging Face
    CLIP folder."""
    modules = _read_json(folder / "modules.json")
    if isinstance(modules, list) and modules:
        first = modules[0] if isinstance(modules[0], dict) else {}
        # Older saves (e.g. clip-ViT-B-32) name the legacy CLIPModel module; newer ones a
        # Transformer module whose folder holds a CLIP config.
        if str(first.get("type", "")).endswith("CLIPModel"):
            return True
        return _is_clip_config(folder / str(first.get("path", "")))
    return _is_clip_config(folder)


def _hub_snapshot(model: str) -> Path | None:
    """The cached snapshot folder of a hub model, if it is in the local cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - always installed with sentence-transformers
        return None
    # sentence-transformers resolves bare names under its own organisation.
    repo = model if "/" in model else f"sentence-transformers/{model}"
    for filename in ("modules.json", "config.json"):
        try:
            found = try_to_load_from_cache(repo, filename)
        except ValueError:  # not a valid repository id
            return None
        if isinstance(found, str):
            return Path(found).parent
    return None


def is_clip_model(model: str) -> bool:
    """Whether ``model`` (a local folder or a hub name) is a CLIP model, judged from its files on
    disk when there are any, else from its name; never reaches the network."""
    folder = Path(model).expanduser()
    if folder.is_dir():
        return _dir_is_clip(folder)
    snapshot = _hub_snapshot(model)
    if snapshot is not None:
        return _dir_is_clip(snapshot)
    base = model.rstrip("/").rsplit("/", 1)[-1]
    return bool(_CLIP_NAME.match(base)) and "multilingual" not in base.lower()


class ClipEmbedder(SentenceTransformerEmbedder):
    """Embeds texts and :class:`~icl_cl.images.Image` inputs into one CLIP space; loads lazily.

    Texts go through the text tower, images through the image tower; a mixed list is embedded in
    one call and the rows come back in the order of the items. Rows are L2-normalised float32.

    Args:
        model: A CLIP model: a sentence-transformers or Hugging Face name, or a local folder.
        device: Torch device, e.g. ``"cpu"`` or ``"cuda"``.
        batch_size: Encoding batch size.
    """

    reads_images = True

    def _load(self) -> Any:
        model = super()._load()
        modalities = list(getattr(model, "modalities", ["text"]))
        if "image" not in modalities or "text" not in modalities:
            raise ConfigError(
                f"embedder {self._name!r} is not a text-and-image (CLIP) model; it supports "
                f"{', '.join(map(str, modalities))}"
            )
        return model

    def encode(
        self, items: Sequence[str | Image], progress: ProgressCallback | None = None
    ) -> np.ndarray:
        """Embed texts and images as unit vectors (float32), one row per item, in order."""
        texts: list[int] = []
        images: list[int] = []
        for i, item in enumerate(items):
            if isinstance(item, Image):
                images.append(i)
            elif isinstance(item, str):
                texts.append(i)
            else:
                raise DataError(
                    f"must be a text or an Image (see icl_cl.images.load_image), "
                    f"got {type(item).__name__}",
                    item=f"#{i}",
                )
        out = np.empty((len(items), self.dim), dtype=np.float32)
        for indices, is_image in ((texts, False), (images, True)):
            for start in range(0, len(indices), _CHUNK):
                rows = indices[start : start + _CHUNK]
                # Texts are wrapped as {"text": ...}: sentence-transformers would otherwise open a
                # text that looks like an image path or URL as an image.
                inputs: list[Any] = [
                    items[i].pil() if is_image else {"text": items[i]}  # type: ignore[union-attr]
                    for i in rows
                ]
                out[rows] = self._encode_chunk(inputs)
                if progress is not None:
                    progress(len(rows))
        return out
