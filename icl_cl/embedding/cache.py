"""An embedder wrapper that remembers vectors by text, and images by their key (in memory, and
optionally on disk), so evaluation embeds each input once, and a resumed run embeds none twice."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from icl_cl.embedding.base import Embedder, ProgressCallback
from icl_cl.images import Image

logger = logging.getLogger(__name__)

# With a folder, texts are embedded and saved this many at a time: a kill loses one chunk at most.
CHUNK = 2048


class CachedEmbedder:
    """Wraps an :class:`Embedder`; texts and images seen before are not embedded again.

    Texts are remembered by their text, images by :attr:`~icl_cl.images.Image.key` (a digest of
    their bytes), in two separate tables, so a text can never be taken for an image.

    With ``folder``, each batch of new inputs is also written as one ``.npz`` file (vectors plus
    the texts as UTF-8 JSON, no pickle; a batch with images adds their keys as a second JSON list,
    and their vectors follow the texts' rows), atomically, under a subfolder named after the
    embedder (files written by another model are never read), and read back by a later instance.

    Attributes:
        misses: Inputs this instance had to embed (neither in memory nor on disk).
    """

    def __init__(self, inner: Embedder, folder: str | Path | None = None) -> None:
        self.inner = inner
        self._vectors: dict[str, np.ndarray] = {}
        self._image_vectors: dict[str, np.ndarray] = {}
        self.misses = 0
        self._n_files = 0
        self.folder: Path | None = None
        if folder is not None:
            digest = hashlib.sha256(inner.name.encode()).hexdigest()[:12]
            self.folder = Path(folder) / digest
            self.folder.mkdir(parents=True, exist_ok=True)
            for file in sorted(self.folder.glob("chunk-*.npz")):
                self._load(file)
                self._n_files += 1

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def reads_images(self) -> bool:
        return self.inner.reads_images

    @property
    def dim(self) -> int:
        return self.inner.dim

    def _load(self, file: Path) -> None:
        try:
            with np.load(file, allow_pickle=False) as data:
                texts = json.loads(data["texts"].tobytes().decode("utf-8"))
                keys = (
                    json.loads(data["images"].tobytes().decode("utf-8"))
                    if "images" in data.files
                    else []
                )
                vectors = data["vectors"]
            if len(vectors) != len(texts) + len(keys):
                raise ValueError(f"{len(vectors)} vectors for {len(texts) + len(keys)} inputs")
        except (OSError, ValueError, KeyError) as exc:  # a damaged file costs a re-embedding only
            logger.warning("ignoring unreadable embedding cache file %s: %s", file, exc)
            return
        for text, vector in zip(texts, vectors[: len(texts)], strict=True):
            self._vectors[text] = vector
        for key, vector in zip(keys, vectors[len(texts) :], strict=True):
            self._image_vectors[key] = vector

    def _save(self, items: list[str | Image], vectors: np.ndarray) -> None:
        from icl_cl.memory.store import write_atomic

        assert self.folder is not None
        text_rows = [i for i, item in enumerate(items) if not isinstance(item, Image)]
        image_rows = [i for i, item in enumerate(items) if isinstance(item, Image)]
        texts = [items[i] for i in text_rows]
        arrays = {
            "vectors": vectors[text_rows + image_rows].astype(np.float32),
            "texts": _json_bytes(texts),
        }
        # Text-only batches keep the original file layout (no "images" entry).
        if image_rows:
            arrays["images"] = _json_bytes([items[i].key for i in image_rows])  # type: ignore[union-attr]
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self._n_files += 1
        write_atomic(self.folder / f"chunk-{self._n_files:06d}.npz", buffer.getvalue())

    def _lookup(self, item: str | Image) -> np.ndarray | None:
        if isinstance(item, Image):
            return self._image_vectors.get(item.key)
        return self._vectors.get(item)

    def _remember(self, item: str | Image, vector: np.ndarray) -> None:
        if isinstance(item, Image):
            self._image_vectors[item.key] = vector
        else:
            self._vectors[item] = vector

    def _todo(self, items: Sequence[str | Image]) -> list[str | Image]:
        """Distinct items not cached yet, first occurrence first (``Image`` hashes by its key)."""
        return [item for item in dict.fromkeys(items) if self._lookup(item) is None]

    def missing(self, items: Sequence[str | Image]) -> int:
        """How many distinct texts and images of ``items`` would have to be embedded."""
        return len(self._todo(items))

    def encode(
        self, items: Sequence[str | Image], progress: ProgressCallback | None = None
    ) -> np.ndarray:
        todo = self._todo(items)
        # Progress counts what is embedded (each miss once): a hit is no work, and a bar sized by
        # ``missing`` ends full.
        step = CHUNK if self.folder is not None else max(len(todo), 1)
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            vectors = self.inner.encode(chunk, progress=progress)
            if self.folder is not None:
                self._save(chunk, vectors)
            self.misses += len(chunk)
            for item, vector in zip(chunk, vectors, strict=True):
                self._remember(item, vector)
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = [self._lookup(item) for item in items]
        return np.stack(rows).astype(np.float32, copy=False)  # type: ignore[arg-type]


def _json_bytes(values: list[str]) -> np.ndarray:
    return np.frombuffer(json.dumps(values, ensure_ascii=False).encode("utf-8"), np.uint8)
