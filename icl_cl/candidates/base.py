"""Where each input's candidate labels come from: one small interface, two sources."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from icl_cl.images import Image
from icl_cl.types import Cost, EclRanker, Evidence, Ranked, Upstream


@dataclass(frozen=True)
class Inferred:
    """Infer-Retrieve-Rank's infer step per input: the LLM's label-like queries, and its cost."""

    queries: list[list[str]]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    calls: list[int]

    @classmethod
    def nothing(cls, n: int) -> Inferred:
        return cls([[] for _ in range(n)], [0] * n, [0] * n, [0] * n)

    def upstream(self, i: int) -> Upstream:
        """Input ``i``'s queries and what writing them cost."""
        cost = Cost(self.calls[i], self.prompt_tokens[i], self.completion_tokens[i])
        queries = tuple(self.queries[i])
        return Upstream(
            cost, None, Evidence(irr_queries=queries, irr_infer_tokens=cost.prompt_tokens)
        )


@dataclass(frozen=True)
class Candidates:
    """Each input's candidates, best first, and (Infer-Retrieve-Rank) what its infer step did."""

    ranked: Ranked
    inferred: Inferred | None = None


class CandidateSource(Protocol):
    """Gives each input its top-``k`` candidate labels."""

    def candidates(
        self,
        items: Sequence[str | Image] | None,
        vectors: np.ndarray,
        k: int,
        exclude: Sequence[frozenset[str]] | None = None,
    ) -> Candidates:
        """Top-``k`` ``(label, score)`` per input.

        Args:
            items: The inputs (texts or images), for a source that reads them; ``None`` when
                only their vectors are to be used.
            vectors: The embedded inputs.
            k: Candidates per input.
            exclude: Per input, ids of stored examples it must not be shown (held-out items).
        """
        ...


class EclTopK:
    """The external continual learner's top-``k`` labels (InCA's candidate stage).

    Args:
        rank: The ECL's ranking (held-out fits pass one with the held-out items left out).
    """

    def __init__(self, rank: EclRanker) -> None:
        self.rank = rank

    def candidates(
        self,
        items: Sequence[str | Image] | None,
        vectors: np.ndarray,
        k: int,
        exclude: Sequence[frozenset[str]] | None = None,
    ) -> Candidates:
        return Candidates(self.rank(vectors, k))
