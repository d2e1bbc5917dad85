"""Candidate sources: each input's top-k labels, from the ECL or from Infer-Retrieve-Rank."""

from __future__ import annotations

from icl_cl.candidates.base import Candidates, CandidateSource, EclTopK, Inferred
from icl_cl.candidates.infer_retrieve_rank import (
    InferRetrieveRank,
    parse_queries,
    reciprocal_rank_fusion,
)
from icl_cl.candidates.sources import candidate_source

__all__ = [
    "CandidateSource",
    "Candidates",
    "EclTopK",
    "InferRetrieveRank",
    "Inferred",
    "candidate_source",
    "parse_queries",
    "reciprocal_rank_fusion",
]
