"""Build the embedder a config names (kept apart so that no embedder module imports another's
subclass back)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from icl_cl.embedding.clip import ClipEmbedder, is_clip_model
from icl_cl.embedding.sentence_transformers import SentenceTransformerEmbedder, resolve_model_path

if TYPE_CHECKING:
    from icl_cl.config import EmbedderConfig


def load_embedder(config: EmbedderConfig) -> SentenceTransformerEmbedder:
    """Build the embedder a config names: a :class:`~icl_cl.embedding.clip.ClipEmbedder` (texts
    and images) when ``config.model`` is a CLIP model, else a text-only
    :class:`~icl_cl.embedding.sentence_transformers.SentenceTransformerEmbedder`."""
    cls = (
        ClipEmbedder
        if is_clip_model(resolve_model_path(config.model))
        else SentenceTransformerEmbedder
    )
    return cls(config.model, device=config.device, batch_size=config.batch_size)
