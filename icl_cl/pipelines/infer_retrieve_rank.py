"""Infer-Retrieve-Rank (D'Oosterlinck et al. 2024) over the store's label space.

- **Infer:** the LLM writes short label-like queries for the input (free text, comma-separated;
  parsed by :func:`parse_queries`), shown a few stored examples nearest to the input with their
  label names.
- **Retrieve:** the input and its queries are embedded; each label scores its best cosine over
  them in the label index (names and descriptions), optionally reweighted by its frequency in
  memory (``score * log(A * prior + e)``) and fused with the ECL's own ranking.
- **Rank:** the LLM reads the top retrieved labels and scores each one as a continuation (the
  options are exactly those labels, so nothing outside them can come back). The classifier fuses
  those scores with the retrieval scores by weights fitted on held-out stored examples, as for
  InCA, and calibrates and decides as for any prediction.

Each step can be switched off (``IRRConfig``). Without retrieval the ECL supplies the candidates
(queried with the input and, if inferred, the queries); without rank the retrieval order decides.
Labels added in a later session are retrievable at once: their vectors join the label index when
they are learned, and no stored label is embedded again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from icl_cl.backends.base import GenerationParams
from icl_cl.config import IRRConfig
from icl_cl.errors import DataError
from icl_cl.prompting import load_template, render_instruction, select_demonstrations
from icl_cl.prompting.render import demonstration_context

if TYPE_CHECKING:
    from icl_cl.pipelines.continual import ContinualClassifier

# Reciprocal-rank fusion constant (Cormack et al. 2009): merges the label-retrieval and ECL
# rankings without fitting, whatever the scales of their scores.
_RRF_K = 60
# Each query searches this many times the number of candidates wanted, so that a label ranked
# low for one query but high for another is still seen.
_SEARCH_FACTOR = 2
# Queries longer than this (characters) are prose, not label-like: they are cut at a word.
_MAX_QUERY_CHARS = 60
_LIST_MARKER = re.compile(r"^\s*(?:(?:[-*•]+|\d+[.)]|\(?[a-z]\))\s*)+", re.IGNORECASE)


def parse_queries(text: str, max_queries: int) -> list[str]:
    """Label-like queries from free LLM output: split on commas, semicolons and newlines; drop
    list markers, quotes, a leading "Tags:", empty and repeated items (case-insensitive)."""
    text = re.sub(r"^\s*(?:tags|keywords|labels)\s*:", "", text, flags=re.IGNORECASE)
    out: list[str] = []
    seen: set[str] = set()
    for part in re.split(r"[,;\n]", text):
        query = _LIST_MARKER.sub("", part).strip().strip("\"'`.").strip()
        if len(query) > _MAX_QUERY_CHARS:
            query = query[:_MAX_QUERY_CHARS].rsplit(" ", 1)[0]
        if query and query.lower() not in seen:
            seen.add(query.lower())
            out.append(query)
        if len(out) == max_queries:
            break
    return out


@dataclass
class Inferred:
    """The infer step's output per input, and its cost."""

    queries: list[list[str]]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    calls: list[int]

    @classmethod
    def nothing(cls, n: int) -> Inferred:
        return cls([[] for _ in range(n)], [0] * n, [0] * n, [0] * n)


EclRanker = Callable[[np.ndarray], list[list[tuple[str, float]]]]


class InferRetrieveRank:
    """The infer and retrieve steps; the classifier runs rank, fusion and the decision."""

    def __init__(self, classifier: ContinualClassifier, config: IRRConfig) -> None:
        self.classifier = classifier
        self.memory = classifier.memory
        self.config = config

    def infer(
        self,
        texts: Sequence[str],
        vectors: np.ndarray,
        exclude: Sequence[frozenset[str]] | None = None,
    ) -> Inferred:
        """The LLM's label-like queries for each text (none when the step is off)."""
        if not self.config.infer:
            return Inferred.nothing(len(texts))
        if any(not isinstance(text, str) for text in texts):
            raise DataError(
                "the infer step writes queries from text; image inputs need irr.infer off"
            )
        backend = self.classifier.backend()
        template = load_template("tags")
        names = {lab.label: lab.name for lab in self.memory.labels}
        prompts = []
        for i, text in enumerate(texts):
            demos = select_demonstrations(
                self.memory,
                vectors[i],
                [],
                "knn",
                self.config.n_demonstrations,
                exclude=exclude[i] if exclude else frozenset(),
            )
            shown = demonstration_context(demos, names)
            prompts.append(render_instruction(backend, template, text=text, demonstrations=shown))
        generations = backend.generate(
            prompts, GenerationParams(max_tokens=self.config.max_query_tokens, stop=("\n",))
        )
        return Inferred(
            [parse_queries(g.text, self.config.max_queries) for g in generations],
            [g.prompt_tokens for g in generations],
            [g.completion_tokens for g in generations],
            [1 if g.completion_tokens else 0 for g in generations],
        )

    def candidates(
        self,
        texts: Sequence[str] | None,
        vectors: np.ndarray,
        k: int,
        rank_ecl: EclRanker,
        exclude: Sequence[frozenset[str]] | None = None,
    ) -> tuple[list[list[tuple[str, float]]], Inferred]:
        """Infer (when ``texts`` are given and the step is on), then retrieve ``k`` candidates.

        ``rank_ecl`` ranks labels for query vectors with the ECL (the held-out fit passes one
        that leaves the held-out items out of memory); it is called only when needed.
        """
        inferred = (
            self.infer(texts, vectors, exclude)
            if texts is not None
            else Inferred.nothing(len(vectors))
        )
        embedded = self.embed_queries(inferred.queries)
        ecl = None
        if self.config.ecl or not self.config.retrieve:
            ecl = rank_ecl(self.ecl_queries(vectors, embedded))
        return self.retrieve(vectors, embedded, k, ecl), inferred

    def retrieve(
        self,
        vectors: np.ndarray,
        queries: Sequence[np.ndarray],
        k: int,
        ecl: Sequence[Sequence[tuple[str, float]]] | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(label, score)`` per input from the label index, the ECL, or both.

        Args:
            vectors: Embedded inputs.
            queries: Embedded inferred queries per input (``(m_i, d)``, may be empty).
            k: Candidates per input.
            ecl: The ECL's ranked candidates per input (fused when ``config.ecl``; the only
                source when ``config.retrieve`` is off).
        """
        if not self.config.retrieve:
            assert ecl is not None
            return [list(c[:k]) for c in ecl]
        labels = self.memory.labels
        prior = self.memory.label_prior() if self.config.prior > 0 else None
        # One search for every input's probes (the input itself, then its queries).
        probes = np.vstack(
            [np.vstack([v[None, :], q]) for v, q in zip(vectors, queries, strict=True)]
        )
        all_sims, all_cols = self.memory.retrieve_labels(probes, _SEARCH_FACTOR * k)
        ends = np.cumsum([1 + len(q) for q in queries])
        out = []
        for i, end in enumerate(ends):
            start = end - 1 - len(queries[i])
            sims, cols = all_sims[start:end], all_cols[start:end]
            best: dict[int, float] = {}
            for s, c in zip(sims.ravel(), cols.ravel(), strict=True):
                if c >= 0 and s > best.get(int(c), -np.inf):
                    best[int(c)] = float(s)
            if prior is not None:
                # xmc.dspy's prior reweighting; A = config.prior.
                best = {
                    c: s * float(np.log(self.config.prior * prior[c] + np.e))
                    for c, s in best.items()
                }
            ranked = sorted(best.items(), key=lambda cs: -cs[1])
            retrieved = [(labels[c].label, s) for c, s in ranked]
            if self.config.ecl and ecl is not None:
                retrieved = reciprocal_rank_fusion([retrieved, list(ecl[i])])
            out.append(retrieved[:k])
        return out

    def embed_queries(self, queries: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Each input's queries embedded, ``(m_i, d)``."""
        flat = [q for qs in queries for q in qs]
        vectors = (
            self.classifier.embedder.encode(flat)
            if flat
            else np.zeros((0, self.memory.dim), np.float32)
        )
        out, at = [], 0
        for qs in queries:
            out.append(vectors[at : at + len(qs)])
            at += len(qs)
        return out

    def ecl_queries(self, vectors: np.ndarray, queries: Sequence[np.ndarray]) -> np.ndarray:
        """What the ECL is queried with when it supplies the candidates: the input, moved
        towards the mean of its inferred queries (InCA's tag step) when there are any."""
        if not self.config.infer or self.config.retrieve:
            return vectors
        out = np.array(vectors, np.float32, copy=True)
        for i, q in enumerate(queries):
            if len(q):
                v = out[i] + q.mean(axis=0)
                out[i] = v / max(float(np.linalg.norm(v)), 1e-12)
        return out


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[tuple[str, float]]],
) -> list[tuple[str, float]]:
    """Merge ranked lists: each label scores ``sum 1 / (60 + rank)`` over the lists it is in."""
    score: dict[str, float] = {}
    for ranking in rankings:
        for rank, (label, _) in enumerate(ranking, start=1):
            score[label] = score.get(label, 0.0) + 1.0 / (_RRF_K + rank)
    return sorted(score.items(), key=lambda ls: -ls[1])
