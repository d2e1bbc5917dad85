"""Demonstration selection: none, kNN (KATE), nearest per candidate label, MMR, random."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from icl_cl.config import DemoStrategy
from icl_cl.types import Example

if TYPE_CHECKING:
    from icl_cl.memory.ecl import ExternalContinualLearner

_POOL = 50  # neighbours considered by MMR and by the per-label filter


def select_demonstrations(
    memory: ExternalContinualLearner,
    query: np.ndarray,
    candidates: Sequence[str],
    strategy: DemoStrategy,
    n: int,
    *,
    exclude: frozenset[str] = frozenset(),
    seed: int = 0,
    mmr_lambda: float = 0.5,
) -> list[Example]:
    """Pick up to ``n`` stored examples to show in the prompt for ``query``.

    Args:
        memory: The ECL holding the examples and their index.
        query: The input's embedding.
        candidates: Candidate labels of the input, in rank order.
        strategy: ``knn`` (most similar, KATE), ``per_label`` (the most similar example of each
            candidate label, in candidate order), ``mmr`` (similar but not redundant), ``random``.
        n: Maximum number of demonstrations.
        exclude: Example ids never to show (the item itself during held-out fitting).
        seed: For ``random``.
        mmr_lambda: Similarity/diversity trade-off of MMR (1.0 is plain kNN).
    """
    if strategy == "none" or n <= 0 or memory.n_examples == 0:
        return []
    if strategy == "random":
        rng = random.Random(seed)
        rows = rng.sample(range(memory.n_examples), min(memory.n_examples, n + len(exclude)))
        return [ex for ex in memory.store.examples(rows) if ex.id not in exclude][:n]
    sims, rows = memory.neighbours(query[None, :], _POOL + len(exclude))
    pairs = [(float(s), int(r)) for s, r in zip(sims[0], rows[0], strict=True) if r >= 0]
    examples = memory.store.examples([r for _, r in pairs])
    pool = [(s, r, ex) for (s, r), ex in zip(pairs, examples, strict=True) if ex.id not in exclude]
    if strategy == "knn":
        return [ex for _, _, ex in pool[:n]]
    if strategy == "per_label":
        chosen: list[Example] = []
        for label in candidates:
            hit = next((ex for _, _, ex in pool if label in ex.labels and ex not in chosen), None)
            if hit is not None:
                chosen.append(hit)
            if len(chosen) == n:
                break
        return chosen
    if strategy == "mmr":
        return _mmr(memory, pool, n, mmr_lambda)
    raise ValueError(f"unknown demonstration strategy {strategy!r}")


def _mmr(
    memory: ExternalContinualLearner, pool: list[tuple[float, int, Example]], n: int, lam: float
) -> list[Example]:
    """Maximal marginal relevance over the neighbour pool."""
    if not pool:
        return []
    vectors = memory.index.vectors([r for _, r, _ in pool])
    relevance = np.array([s for s, _, _ in pool])
    chosen: list[int] = []
    while len(chosen) < min(n, len(pool)):
        if chosen:
            redundancy = (vectors @ vectors[chosen].T).max(axis=1)
        else:
            redundancy = np.zeros(len(pool))
        value = lam * relevance - (1 - lam) * redundancy
        value[chosen] = -np.inf
        chosen.append(int(np.argmax(value)))
    return [pool[i][2] for i in chosen]
