"""An embedder wrapper that remembers vectors by text (in memory, and optionally on disk), so
evaluation embeds each text once, and a resumed run embeds no text twice."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from icl_cl.embedding.base import Embedder, ProgressCallback

logger = logging.getLogger(__name__)

# With a folder, texts are embedded and saved this many at a time: a kill loses one chunk at most.
CHUNK = 2048


class CachedEmbedder:
    """Wraps an :class:`Embedder`; texts seen before are not embedded again.

    With ``folder``, each batch of new texts is also written as one ``.npz`` file (vectors plus
    the texts as UTF-8 JSON, no pickle), atomically, under a subfolder named after the embedder
    (files written by another model are never read), and read back by a later instance.

    Attributes:
        misses: Texts this instance had to embed (neither in memory nor on disk).
    """

    def __init__(self, inner: Embedder, folder: str | Path | None = None) -> None:
        self.inner = inner
        self._vectors: dict[str, np.ndarray] = {}
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
    def dim(self) -> int:
        return self.inner.dim

    def _load(self, file: Path) -> None:
        try:
            with np.load(file, allow_pickle=False) as data:
                texts = json.loads(data["texts"].tobytes().decode("utf-8"))
                vectors = data["vectors"]
        except (OSError, ValueError, KeyError) as exc:  # a damaged file costs a re-embedding only
            logger.warning("ignoring unreadable embedding cache file %s: %s", file, exc)
            return
        for text, vector in zip(texts, vectors, strict=True):
            self._vectors[text] = vector

    def _save(self, texts: list[str], vectors: np.ndarray) -> None:
        from icl_cl.memory.store import write_atomic

        assert self.folder is not None
        buffer = io.BytesIO()
        payload = np.frombuffer(json.dumps(texts, ensure_ascii=False).encode("utf-8"), np.uint8)
        np.savez(buffer, vectors=vectors.astype(np.float32), texts=payload)
        self._n_files += 1
        write_atomic(self.folder / f"chunk-{self._n_files:06d}.npz", buffer.getvalue())

    def missing(self, items: Sequence[str]) -> int:
        """How many distinct texts of ``items`` would have to be embedded."""
        return sum(t not in self._vectors for t in dict.fromkeys(items))

    def encode(self, items: Sequence[str], progress: ProgressCallback | None = None) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in items if t not in self._vectors))
        step = CHUNK if self.folder is not None else max(len(todo), 1)
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            vectors = self.inner.encode(chunk, progress=progress)
            if self.folder is not None:
                self._save(chunk, vectors)
            self.misses += len(chunk)
            for text, vector in zip(chunk, vectors, strict=True):
                self._vectors[text] = vector
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vectors[t] for t in items]).astype(np.float32, copy=False)
