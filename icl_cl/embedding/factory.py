"""Build the embedder a config names (kept apart so that no embedder module imports another's
subclass back)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from icl_cl.embedding.base import Embedder
from icl_cl.embedding.clip import ClipEmbedder, is_clip_model
from icl_cl.embedding.onnx import OnnxSentenceEmbedder
from icl_cl.embedding.sentence_transformers import SentenceTransformerEmbedder, resolve_model_path
from icl_cl.errors import ConfigError

if TYPE_CHECKING:
    from icl_cl.config import EmbedderConfig


def load_embedder(config: EmbedderConfig) -> Embedder:
    """Build the embedder a config names: a :class:`~icl_cl.embedding.clip.ClipEmbedder` (texts
    and images) when ``config.model`` is a CLIP model, an
    :class:`~icl_cl.embedding.onnx.OnnxSentenceEmbedder` with ``backend: onnx``, else a
    text-only :class:`~icl_cl.embedding.sentence_transformers.SentenceTransformerEmbedder`; with
    ``config.llm_view``, the LLM view (see :func:`~icl_cl.embedding.llm_view.load_llm_view`)."""
    if config.llm_view is not None:
        from icl_cl.embedding.llm_view import load_llm_view

        concat = config.llm_view.combine == "concat"
        sentence = load_embedder(config.model_copy(update={"llm_view": None})) if concat else None
        return load_llm_view(config, sentence)
    clip = is_clip_model(resolve_model_path(config.model))
    if config.backend == "onnx":
        if clip:
            raise ConfigError(
                f"embedder backend 'onnx' takes text models; {config.model!r} is CLIP"
            )
        return OnnxSentenceEmbedder(
            config.model, batch_size=config.batch_size, quantize=config.quantize
        )
    if clip:
        return ClipEmbedder(config.model, device=config.device, batch_size=config.batch_size)
    return SentenceTransformerEmbedder(
        config.model, device=config.device, batch_size=config.batch_size, pack=config.pack
    )
