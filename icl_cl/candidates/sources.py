"""The candidate source a classifier config asks for."""

from __future__ import annotations

from icl_cl.backends.base import LLMBackend
from icl_cl.candidates.base import CandidateSource, EclTopK
from icl_cl.candidates.infer_retrieve_rank import InferRetrieveRank
from icl_cl.config import IRRConfig
from icl_cl.embedding import Embedder
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.types import EclRanker


def candidate_source(
    memory: ExternalContinualLearner,
    embedder: Embedder,
    irr: IRRConfig | None,
    rank: EclRanker,
    backend: LLMBackend | None = None,
) -> CandidateSource:
    """The ECL's top-k (``irr`` is ``None``), or Infer-Retrieve-Rank.

    Args:
        memory: The ECL.
        embedder: Embeds Infer-Retrieve-Rank's queries.
        irr: Infer-Retrieve-Rank's settings, or ``None``.
        rank: The ECL's ranking (held-out fits pass one that leaves their items out).
        backend: The LLM of Infer-Retrieve-Rank's infer step, when it runs.
    """
    if irr is None:
        return EclTopK(rank)
    return InferRetrieveRank(memory, embedder, irr, rank, backend)
