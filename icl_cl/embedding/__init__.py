"""Embedders: map texts (and, with a CLIP model, images) to L2-normalised float32 vectors."""

from __future__ import annotations

from icl_cl.embedding.base import Embedder
from icl_cl.embedding.centred_embedder import CentredEmbedder, centred_for_store
from icl_cl.embedding.clip import ClipEmbedder, is_clip_model
from icl_cl.embedding.factory import load_embedder
from icl_cl.embedding.sentence_transformers import SentenceTransformerEmbedder

__all__ = [
    "CentredEmbedder",
    "ClipEmbedder",
    "Embedder",
    "SentenceTransformerEmbedder",
    "centred_for_store",
    "is_clip_model",
    "load_embedder",
]
