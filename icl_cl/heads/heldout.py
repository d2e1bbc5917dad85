"""Held-out stored examples: what the heads are fitted on.

Stored items are drawn with the fusion seed and scored as if they had never been learned (their
contribution to the ECL's statistics is subtracted exactly), so each is seen as a new input is:
its candidates, and, when the LLM reads, the LLM's scores of them. The candidate step and the LLM
reading are passed in, so that the held-out items go through the same ones as predictions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from icl_cl.images import Image
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.item_groups import input_key
from icl_cl.types import EclRanker, Example, Progress, Ranked, counter

# Held-out stored examples are scored in folds of at most this many (see
# StoreHeldOutSource.sample).
FOLD = 200


def fold_size(n_examples: int, most: int) -> int:
    """Items held out at once: at most ``most`` and at most a tenth of the store, so each is
    scored by a memory almost as large as the real one (small stores are not made to look
    worse)."""
    return max(1, min(most, n_examples // 10))


CandidateStep = Callable[
    [Sequence[str | Image], np.ndarray, EclRanker, Sequence[frozenset[str]]], Ranked
]
"""``(items, vectors, rank_ecl, exclude) -> candidates``: the classifier's candidate step, with
``rank_ecl`` in place of the ECL and ``exclude`` (stored example ids per item) kept out of any
demonstration."""
ReadStep = Callable[
    [
        Sequence[str | Image],
        np.ndarray,
        list[list[str]],
        Sequence[frozenset[str]],
        Callable[[int], None] | None,
    ],
    list[np.ndarray],
]
"""``(items, vectors, candidate labels, exclude, done) -> LLM scores`` per item (``-inf`` where
there is none); calls ``done(n)`` as items are read; raises
:class:`~icl_cl.errors.BackendError` when the LLM could read none of them."""


@dataclass(frozen=True)
class HeldOutScores:
    """Held-out items as the classifier sees them.

    Attributes:
        labels: Per item, its candidate labels.
        sources: Per score source (``ecl``, ``llm``), per item, the scores of its candidates.
        gold: Per item, its gold labels.
    """

    labels: list[list[str]]
    sources: dict[str, list[np.ndarray]]
    gold: list[tuple[str, ...]]

    def __len__(self) -> int:
        return len(self.labels)

    def gold_columns(self) -> list[list[int]]:
        """Per item, the candidate column of each gold label, ``-1`` for one outside them."""
        out = []
        for cands, gold in zip(self.labels, self.gold, strict=True):
            position = {label: j for j, label in enumerate(cands)}
            out.append([position.get(label, -1) for label in gold])
        return out

    def gold_positions(self) -> list[set[int]]:
        """Per item, the candidate columns holding a gold label."""
        return [{j for j in cols if j >= 0} for cols in self.gold_columns()]

    def item_sources(self, i: int) -> dict[str, np.ndarray]:
        return {name: values[i] for name, values in self.sources.items()}


class HeldOutSource(Protocol):
    """Scores of ``n`` held-out items; with ``read``, the LLM's too (source ``llm``)."""

    def scores(self, n: int, read: bool) -> HeldOutScores: ...


@dataclass(frozen=True)
class Sample:
    """Held-out stored items: each as an example (gold: every label its copies carry), its
    vector, and the ids of the stored examples it stands for (its copies)."""

    examples: list[Example]
    vectors: np.ndarray
    ids: list[frozenset[str]]
    rows: list[list[int]]


def draw_sample(memory: ExternalContinualLearner, n: int, seed: int) -> Sample:
    """``n`` stored items drawn with ``seed``, their vectors and the ids they stand for.

    An item is held out together with every stored copy of its input (the same text up to case,
    Unicode form and spacing, or the same image): a copy left in memory would be found by the
    held-out item, which would then look easier than a new input, and the calibration would
    learn overconfidence. In a multi-label store, copies learned in several sessions (each with
    that session's labels) stand for one item whose gold labels are all of theirs; in a
    single-label store the drawn item keeps its own label.
    """
    # Rows this memory has loaded: a store may have grown since (a service's snapshot).
    keys = [input_key(k) for k in memory.store.input_keys()[: memory.n_examples]]
    copies: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        copies.setdefault(key, []).append(row)
    # Items in an order set by the seed and their input alone, not by when they were learned:
    # sessions learned one by one or all at once hold out the same items (and fit the same
    # heads); and a larger held-out set holds the smaller ones, so the calibration's extra LLM
    # reads reuse the fusion's (cached) ones.
    order = sorted(copies, key=lambda key: hashlib.sha256(f"{seed}:{key}".encode()).digest())
    groups = [copies[key] for key in order[: max(n, 0)]]
    flat = [r for g in groups for r in g]
    by_row = dict(zip(flat, memory.store.examples(flat), strict=True))
    multi = bool(memory.multi_label)
    examples = [
        Example(
            by_row[g[0]].id,
            by_row[g[0]].text,
            dict.fromkeys(lab for r in (g if multi else g[:1]) for lab in by_row[r].labels),
            image=by_row[g[0]].image,
        )
        for g in groups
    ]
    ids = [frozenset(by_row[r].id for r in g) for g in groups]
    vectors = memory.index.vectors([g[0] for g in groups])
    return Sample(examples, vectors, ids, groups)


class StoreHeldOutSource:
    """The :class:`HeldOutSource` of one store and scorer: draws stored items and scores them
    as if they had never been learned (the items themselves are a :class:`Sample`).

    Args:
        memory: The ECL.
        scorer: The ECL scorer.
        seed: Seed of the draw (a larger set holds the smaller ones: see :meth:`sample`).
        candidates: The classifier's candidate step.
        read: The classifier's LLM reading (``None``: no LLM).
        progress: Told how far each stage got (``fitting: N held-out items (ECL)``, ``fitting:
            N LLM reads of held-out items``).
    """

    def __init__(
        self,
        memory: ExternalContinualLearner,
        *,
        scorer: str,
        seed: int,
        candidates: CandidateStep,
        read: ReadStep | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.memory = memory
        self.scorer = scorer
        self.seed = seed
        self._candidates = candidates
        self._read = read
        self._progress = progress

    def sample(self, n: int) -> Sample:
        """``n`` stored items drawn with the seed (see :func:`draw_sample`)."""
        return draw_sample(self.memory, n, self.seed)

    def _ecl_ranker(self, sample: Sample, stage: str) -> EclRanker:
        """Ranks the sample's items (in order) with the ECL as if they had never been learned,
        held out in folds (:func:`fold_size`)."""
        fold = fold_size(self.memory.n_items, FOLD)  # items: the same for sessions and union
        groups = sample.rows

        def rank(queries: np.ndarray, k: int) -> Ranked:
            ranked: Ranked = []
            for lo in range(0, len(groups), fold):
                part = [r for g in groups[lo : lo + fold] for r in g]
                try:
                    held_out = self.memory.heldout_scorer(part, self.scorer)
                except np.linalg.LinAlgError:
                    # Too few examples left to estimate the scorer (a store of a handful): the
                    # fold's items get no candidates, and nothing is fitted on them.
                    ranked += [[] for _ in groups[lo : lo + fold]]
                    continue
                ranked += self.memory.ranked(held_out.scores(queries[lo : lo + fold]), k)
                if self._progress is not None:
                    self._progress(stage, min(lo + fold, len(groups)), len(groups))
            return ranked

        return rank

    def scores(self, n: int, read: bool) -> HeldOutScores:
        """The ECL's (and with ``read`` the LLM's) scores of ``n`` held-out items' candidates;
        items that got no candidate (possible only in a store of a handful of examples) are
        left out."""
        sample = self.sample(n)
        items = [ex.item for ex in sample.examples]
        stage = f"fitting: {len(items)} held-out items (ECL)"
        ranked = self._candidates(
            items, sample.vectors, self._ecl_ranker(sample, stage), sample.ids
        )
        kept = [i for i, c in enumerate(ranked) if c]
        ranked = [ranked[i] for i in kept]
        labels = [[label for label, _ in c] for c in ranked]
        sources = {"ecl": [np.array([s for _, s in c]) for c in ranked]}
        if read:
            if self._read is None:
                raise ValueError("held-out readings need the LLM's read step")
            stage = f"fitting: {len(kept)} LLM reads of held-out items"
            done = counter(self._progress, stage, len(kept))
            read_items = [items[i] for i in kept]
            vectors, ids = sample.vectors[kept], [sample.ids[i] for i in kept]
            sources["llm"] = self._read(read_items, vectors, labels, ids, done)
        return HeldOutScores(labels, sources, [tuple(sample.examples[i].labels) for i in kept])
