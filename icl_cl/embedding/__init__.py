"""Embedders: map texts (and later images) to L2-normalised float32 vectors."""

from __future__ import annotations

from icl_cl.embedding.base import Embedder
from icl_cl.embedding.sentence_transformers import SentenceTransformerEmbedder, load_embedder

__all__ = ["Embedder", "SentenceTransformerEmbedder", "load_embedder"]
