"""Builds the LLM view an :class:`~icl_cl.config.EmbedderConfig` asks for: alone, or concatenated
after the sentence embedder."""

from __future__ import annotations

from typing import TYPE_CHECKING

from icl_cl.embedding.base import Embedder
from icl_cl.embedding.concat import ConcatEmbedder

if TYPE_CHECKING:
    from icl_cl.config import EmbedderConfig


def load_llm_view(config: EmbedderConfig, sentence: Embedder | None) -> Embedder:
    """The embedder of ``config.llm_view`` (which must be set), with ``sentence`` (the sentence
    embedder of ``config``) first when ``combine`` is ``"concat"``."""
    view = config.llm_view
    assert view is not None, "load_llm_view needs config.llm_view"
    llm: Embedder
    if view.backend == "vllm":
        from icl_cl.embedding.vllm_hidden import VLLMHiddenStateEmbedder

        llm = VLLMHiddenStateEmbedder(
            view.model,
            layer=view.layer,
            pooling=view.pooling,
            max_tokens=view.max_tokens,
            template=view.template,
        )
    else:
        from icl_cl.embedding.llm_hidden import HiddenStateEmbedder

        llm = HiddenStateEmbedder(
            view.model,
            layer=view.layer,
            pooling=view.pooling,
            max_tokens=view.max_tokens,
            template=view.template,
            dtype=view.dtype,
            batch_size=view.batch_size,
            device=config.device,
        )
    if view.combine == "alone":
        return llm
    if sentence is None:
        raise ValueError("combine 'concat' needs the sentence embedder")
    return ConcatEmbedder([sentence, llm])
