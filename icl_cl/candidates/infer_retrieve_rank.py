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
from collections.abc import Sequence

import numpy as np

from icl_cl.backends.base import GenerationParams, LLMBackend
from icl_cl.candidates.base import Candidates, Inferred
from icl_cl.config import IRRConfig
from icl_cl.embedding import Embedder
from icl_cl.errors import ConfigError, DataError
from icl_cl.images import Image
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.prompting import load_template, render_instruction, select_demonstrations
from icl_cl.prompting.render import demonstration_context
from icl_cl.types import EclRanker, Ranked

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


class InferRetrieveRank:
    """The infer and retrieve steps (a candidate source); the classifier runs rank, fusion and
    the decision.

    Args:
        memory: The ECL (its label index, its stored examples for the infer step's examples).
        embedder: Embeds the inferred queries.
        config: Which steps run.
        rank_ecl: The ECL's ranking, used when the ECL supplies or joins the candidates.
        backend: The LLM that writes the queries (needed only by the infer step).
    """

    def __init__(
        self,
        memory: ExternalContinualLearner,
        embedder: Embedder,
        config: IRRConfig,
        rank_ecl: EclRanker,
        backend: LLMBackend | None = None,
    ) -> None:
        self.memory = memory
        self.embedder = embedder
        self.config = config
        self.rank_ecl = rank_ecl
        self.backend = backend

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
        backend = self.backend
        if backend is None:
            raise ConfigError("Infer-Retrieve-Rank's infer step needs an LLM backend")
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
        items: Sequence[str | Image] | None,
        vectors: np.ndarray,
        k: int,
        exclude: Sequence[frozenset[str]] | None = None,
    ) -> Candidates:
        """Infer (when ``items`` are given and the step is on), then retrieve ``k`` candidates.

        The ECL is asked (``rank_ecl``) only when it supplies or joins the candidates.
        """
        inferred = (
            self.infer(items, vectors, exclude)
            if items is not None
            else Inferred.nothing(len(vectors))
        )
        embedded = self.embed_queries(inferred.queries)
        ecl = None
        if self.config.ecl or not self.config.retrieve:
            ecl = self.rank_ecl(self.ecl_queries(vectors, embedded), k)
        return Candidates(self.retrieve(vectors, embedded, k, ecl), inferred)

    def retrieve(
        self,
        vectors: np.ndarray,
        queries: Sequence[np.ndarray],
        k: int,
        ecl: Sequence[Sequence[tuple[str, float]]] | None = None,
    ) -> Ranked:
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
        stats = self.memory.stats  # the share of stored examples that carry each label
        prior = stats.counts / max(stats.n_examples, 1) if self.config.prior > 0 else None
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
        vectors = self.embedder.encode(flat) if flat else np.zeros((0, self.memory.dim), np.float32)
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
