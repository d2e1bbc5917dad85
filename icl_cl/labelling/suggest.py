"""What to label next (active learning): rank unlabelled inputs by how much labelling them
would help, and say why for each.

The pool is scored in batches through the classifier's own predictions (calibrated
probabilities and conformal sets, the heads fitted on held-out stored examples), so memory
holds one batch and a shortlist, never the whole pool's predictions or vectors. Strategies:

- ``combined`` (the default): the margin shortlists the pool, inputs whose nearest label has
  no stored example first, then MMR over the embeddings picks a batch that is uncertain and
  not made of near-copies (a share of ``coverage`` can be added to the margin);
- ``expected_change``: the margin times how far labelling the input would
  move the class means, in expectation over its probabilities (``sum_c p_c d_c / (n_c + 1)``,
  ``d_c`` its Mahalanobis distance to label ``c``'s mean under the store's pooled within-label
  covariance: learning it as ``c`` moves that mean by ``(x - mu_c) / (n_c + 1)``). Uncertain
  inputs first, and among them those far from what their labels' means already say, of labels
  with few examples;
- ``margin``: one minus the gap between the two most probable labels (breaking ties);
- ``entropy``: the entropy of the probabilities, the mass outside the candidates included;
- ``conformal``: the size of the conformal set at ``confidence`` (entropy breaks ties);
- ``coverage``: inputs likely to belong to labels with few stored examples, and first those
  whose nearest label description is a label with none;
- ``diversity``: k-center greedy (core-set) over the embeddings, starting from the stored
  examples, so the batch covers what the store has not seen;
- ``random``: a seeded uniform sample (the baseline).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

import numpy as np

from icl_cl.config import ClassifierConfig
from icl_cl.embedding import Embedder
from icl_cl.errors import DataError
from icl_cl.images import Image
from icl_cl.inputs import checks
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.types import Prediction, Progress

StrategyName = Literal[
    "combined",
    "expected_change",
    "margin",
    "entropy",
    "conformal",
    "coverage",
    "diversity",
    "random",
]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
"""The strategies of :func:`suggest`, the default first."""

_NEAREST_TEXT_CHARS = 200


@dataclass(frozen=True)
class SuggestOptions:
    """How :func:`suggest` ranks a pool.

    Attributes:
        strategy: One of :data:`STRATEGIES`.
        k: Candidate labels per input.
        confidence: Coverage of the conformal sets (their size, and the labels in question).
        neighbours: Nearest stored examples given with each suggestion.
        batch_size: Pool inputs embedded and scored at a time.
        seed: Seed of ``random``.
        few: Coverage weighs a label with ``n`` examples by ``few / (few + n)``.
        coverage_weight: ``combined``: the share of coverage's few-example term added to the
            margin (0: the active-learning evaluation found it cost labels on Debian
            sections and gained nothing on WordNet; an input whose nearest label has no
            example comes first whatever it is).
        mmr_lambda: ``combined``: the weight of uncertainty against similarity to the inputs
            already picked (1: uncertainty alone).
        shortlist: ``combined`` and ``diversity`` pick the batch among the ``shortlist x
            budget`` best inputs by their first score.
        scorer: The ECL scorer (``None``: the store's).
    """

    strategy: str = "combined"
    k: int = 10
    confidence: float = 0.9
    neighbours: int = 3
    batch_size: int = 512
    seed: int = 0
    few: float = 5.0
    coverage_weight: float = 0.0
    mmr_lambda: float = 0.5
    shortlist: int = 10
    scorer: str | None = None

    def check(self, budget: int) -> None:
        """Refuse a budget or an option out of range, naming it."""
        if self.strategy not in STRATEGIES:
            raise DataError(
                f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"
            )
        for name, value in (("budget", budget), ("batch_size", self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DataError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.mmr_lambda <= 1:
            raise DataError(f"mmr_lambda must be in [0, 1], got {self.mmr_lambda!r}")
        if self.neighbours < 0 or self.shortlist < 1 or self.few <= 0:
            raise DataError("neighbours must be >= 0, shortlist >= 1 and few > 0")


@dataclass(frozen=True)
class Neighbour:
    """A stored example near a suggested input."""

    id: str
    labels: tuple[str, ...]
    similarity: float
    text: str = ""


@dataclass(frozen=True)
class Suggestion:
    """One input to label next, and why.

    Attributes:
        id: The input's id.
        rank: 1 for the input to label first.
        strategy: The strategy that ranked it.
        score: Its priority under that strategy (higher first).
        reason: Why, in a sentence.
        margin: One minus the gap between its two most probable labels (1: a tie).
        entropy: Entropy of its probabilities over the candidates and "none of them", divided
            by its maximum (1: no idea).
        set_size: Labels in its conformal set at the options' confidence.
        labels: The candidate labels in question, most probable first, with their
            probabilities.
        counts: Stored examples of each label in question.
        nearest: The nearest stored examples.
        text: The input's text (empty for an image).
    """

    id: str
    rank: int
    strategy: str
    score: float
    reason: str
    margin: float
    entropy: float
    set_size: int
    labels: dict[str, float]
    counts: dict[str, int]
    nearest: tuple[Neighbour, ...] = ()
    text: str = ""


@dataclass
class _Scored:
    """A batch's first scores and what the final ranking needs of each input."""

    positions: np.ndarray
    score: np.ndarray
    margin: np.ndarray
    entropy: np.ndarray
    coverage: np.ndarray
    novelty: np.ndarray
    change: np.ndarray
    vectors: np.ndarray
    predictions: list[Prediction]
    rare: list[str | None] = field(default_factory=list)

    @staticmethod
    def concat(parts: Sequence[_Scored]) -> _Scored:
        arrays = {
            name: np.concatenate([getattr(p, name) for p in parts])
            for name in ("positions", "score", "margin", "entropy", "coverage", "novelty", "change")
        }
        return _Scored(
            **arrays,
            vectors=np.vstack([p.vectors for p in parts]),
            predictions=[x for p in parts for x in p.predictions],
            rare=[x for p in parts for x in p.rare],
        )

    def take(self, rows: np.ndarray) -> _Scored:
        return _Scored(
            self.positions[rows],
            self.score[rows],
            self.margin[rows],
            self.entropy[rows],
            self.coverage[rows],
            self.novelty[rows],
            self.change[rows],
            self.vectors[rows],
            [self.predictions[i] for i in rows],
            [self.rare[i] for i in rows],
        )


class Classifier(Protocol):
    """What :func:`suggest_from` needs of a :class:`~icl_cl.classifier.ContinualClassifier`."""

    memory: ExternalContinualLearner
    embedder: Embedder
    config: ClassifierConfig

    def predict_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        scorer: str | None = None,
        confidence: float | None = None,
    ) -> list[Prediction]: ...


def suggest_from(
    clf: Classifier,
    texts: Sequence[object],
    budget: int,
    ids: Sequence[str] | None,
    options: SuggestOptions,
    progress: Progress | None = None,
) -> list[Suggestion]:
    """:func:`suggest` over a classifier's store, from its inputs as ``predict`` takes them
    (checked first), predicted by the ECL alone: a pool is large, and reading every input of
    it with the LLM would cost what predicting it does. ``ids`` default to the positions."""
    checks.check_prediction_options(options.k, options.confidence)
    items = checks.prediction_inputs(
        texts,
        max_chars=clf.config.max_text_chars,
        reads_images=clf.embedder.reads_images,
        embedder=clf.embedder.name,
    )

    def predict(queries: np.ndarray) -> list[Prediction]:
        k, scorer, confidence = options.k, options.scorer, options.confidence
        return clf.predict_vectors(queries, k, scorer=scorer, confidence=confidence)

    return suggest(
        clf.memory,
        [str(i) for i in range(len(items))] if ids is None else list(ids),
        items,
        budget,
        embed=clf.embedder.encode,
        predict=predict,
        options=options,
        progress=progress,
    )


def suggest(
    memory: ExternalContinualLearner,
    ids: Sequence[str],
    items: Sequence[str | Image],
    budget: int,
    *,
    embed: Callable[[Sequence[str | Image]], np.ndarray],
    predict: Callable[[np.ndarray], list[Prediction]],
    options: SuggestOptions,
    progress: Progress | None = None,
) -> list[Suggestion]:
    """The ``budget`` inputs of a pool to label next, best first, each with its reason.

    Inputs whose id the store holds already are skipped. The pool is embedded and predicted
    ``options.batch_size`` at a time; only the shortlist is kept between batches.

    Args:
        memory: The ECL of the store.
        ids: The pool's ids, unique.
        items: The pool's inputs (texts or images), aligned with ``ids``.
        budget: How many to suggest.
        embed: The store's embedder.
        predict: Predictions of embedded inputs with ``options.k`` candidates and a conformal
            set at ``options.confidence``.
        options: The strategy and its settings.
        progress: Told how far scoring the pool got.
    """
    options.check(budget)
    if len(ids) != len(items):
        raise DataError(f"{len(ids)} ids but {len(items)} inputs")
    if len(set(ids)) != len(ids):
        raise DataError("pool ids must be unique")
    memory.require_examples()
    stored = set(memory.store.existing_ids(list(ids)))
    todo = [i for i, ident in enumerate(ids) if ident not in stored]
    keep = budget * (options.shortlist if options.strategy in ("combined", "diversity") else 1)
    kept: list[_Scored] = []
    rng = np.random.default_rng(options.seed)
    done = 0
    for start in range(0, len(todo), options.batch_size):
        positions = np.asarray(todo[start : start + options.batch_size])
        vectors = embed([items[i] for i in positions])
        scored = _score_batch(memory, positions, vectors, predict(vectors), options, rng)
        kept = [_best(_Scored.concat([*kept, scored]), keep)]
        done += len(positions)
        if progress is not None:
            progress("scoring pool", done, len(todo))
    if not kept:
        return []
    pool = kept[0]
    order = _select(pool, budget, options)
    return _suggestions(memory, pool.take(order), ids, items, options)


def _best(scored: _Scored, n: int) -> _Scored:
    if len(scored.score) <= n:
        return scored
    # Ties go to the earlier input, so a ranking does not depend on the batch size.
    order = np.lexsort((scored.positions, -scored.score))[:n]
    return scored.take(order)


def _score_batch(
    memory: ExternalContinualLearner,
    positions: np.ndarray,
    vectors: np.ndarray,
    predictions: list[Prediction],
    options: SuggestOptions,
    rng: np.random.Generator,
) -> _Scored:
    """Each input's uncertainty, coverage and novelty, and its first score under the strategy."""
    multi = bool(memory.multi_label)
    margin = np.array([_margin(p, multi) for p in predictions])
    entropy = np.array([_entropy(p, multi) for p in predictions])
    counts = memory.stats.counts
    rows, cols, probs = _candidate_entries(predictions, memory.stats.col)
    few = options.few
    few_share = np.bincount(rows, probs * few / (few + counts[cols]), minlength=len(predictions))
    rare = _nearest_empty_label(memory, vectors)
    no_example = np.array([r is not None for r in rare], np.float64)
    coverage = no_example + few_share
    novelty = np.zeros(len(positions))
    if options.strategy == "diversity":
        sims, _rows = memory.neighbours(vectors, 1)
        novelty = 1.0 - sims[:, 0].astype(np.float64)
    change = np.zeros(len(positions))
    if options.strategy == "expected_change":
        change = _expected_change(memory, vectors, (rows, cols, probs))
    sizes = np.array([len(p.set or ()) for p in predictions], np.float64)
    score = {
        "margin": lambda: margin,
        "entropy": lambda: entropy,
        "conformal": lambda: sizes + entropy,
        "coverage": lambda: coverage,
        "diversity": lambda: novelty,
        "random": lambda: rng.random(len(positions)),
        "combined": lambda: margin + no_example + options.coverage_weight * few_share,
        "expected_change": lambda: margin * change,
    }[options.strategy]()
    return _Scored(
        positions, score, margin, entropy, coverage, novelty, change, vectors, predictions, rare
    )


def _candidate_entries(
    predictions: list[Prediction], col: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each prediction's candidate probabilities as ``(input row, label column, probability)``
    entries: sums over an input's candidates are then one ``np.bincount`` over its row."""
    entries = [(i, col[lab], v) for i, p in enumerate(predictions) for lab, v in p.scores.items()]
    rows, cols, probs = zip(*entries, strict=True) if entries else ((), (), ())
    return np.array(rows, np.int64), np.array(cols, np.int64), np.array(probs, np.float64)


def _expected_change(
    memory: ExternalContinualLearner,
    vectors: np.ndarray,
    entries: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> np.ndarray:
    """Per input, ``sum_c p_c d_c / (n_c + 1)`` over its candidate labels (``entries``, see
    :func:`_candidate_entries`): the expected shift of the class mean it would be learned into,
    ``d_c`` in Mahalanobis distance under the store's pooled within-label covariance (the
    ``mahalanobis`` scorer's, whatever scorer predicts), which weighs a move along the
    directions the labels vary in less."""
    squared = -memory.score_matrix(vectors, "mahalanobis").astype(np.float64)
    distance = np.sqrt(np.maximum(np.where(np.isfinite(squared), squared, 0.0), 0.0))
    rows, cols, probs = entries
    shift = probs * distance[rows, cols] / (memory.stats.counts[cols] + 1)
    return np.bincount(rows, shift, minlength=len(vectors))


def _sorted_probabilities(pred: Prediction) -> list[tuple[str, float]]:
    return sorted(pred.scores.items(), key=lambda kv: -kv[1])


def _margin(pred: Prediction, multi: bool) -> float:
    """1 - (p1 - p2); multi-label: the most undecided label's ``1 - |2p - 1|``."""
    probs = [v for _, v in _sorted_probabilities(pred)]
    if multi:
        return max((1.0 - abs(2 * p - 1) for p in probs), default=0.0)
    top = [*probs, 0.0, 0.0]
    return 1.0 - (top[0] - top[1])


def _entropy(pred: Prediction, multi: bool) -> float:
    """Normalised entropy (multi-label: the mean binary entropy of the candidates)."""
    probs = np.clip(np.array(list(pred.scores.values()), np.float64), 0.0, 1.0)
    if multi:
        if not len(probs):
            return 0.0
        p = np.clip(probs, 1e-12, 1 - 1e-12)
        return float(np.mean(-(p * np.log(p) + (1 - p) * np.log(1 - p))) / math.log(2))
    outside = pred.evidence.p_outside_candidates or 0.0
    p = np.append(probs, outside)
    p = p[p > 0]
    if len(p) < 2:
        return 0.0
    p = p / p.sum()
    return float(-(p * np.log(p)).sum() / math.log(len(pred.scores) + 1))


def _nearest_empty_label(memory: ExternalContinualLearner, vectors: np.ndarray) -> list[str | None]:
    """Per input, the label nearest to it by name and description when that label has no
    stored example (``None`` otherwise, and for every input when every label has examples)."""
    counts = memory.stats.counts
    labels = memory.labels
    empty = {lab.label for i, lab in enumerate(labels) if i >= len(counts) or counts[i] == 0}
    if not empty:
        return [None] * len(vectors)
    _cos, cols = memory.retrieve_labels(vectors, 1)
    names = [labels[c].label if c >= 0 else None for c in cols[:, 0]]
    return [name if name in empty else None for name in names]


def _select(pool: _Scored, budget: int, options: SuggestOptions) -> np.ndarray:
    """Rows of the shortlist to suggest, in order."""
    n = min(budget, len(pool.score))
    if options.strategy == "diversity":
        return _k_center(pool.vectors, pool.novelty, n)
    if options.strategy == "combined":
        return _mmr(pool.vectors, pool.score, n, options.mmr_lambda)
    return np.lexsort((pool.positions, -pool.score))[:n]


def _k_center(vectors: np.ndarray, distance: np.ndarray, n: int) -> np.ndarray:
    """k-center greedy: each pick is the input farthest (cosine distance) from the stored
    examples and from the picks before it."""
    x = np.asarray(vectors, np.float64)
    far = np.asarray(distance, np.float64).copy()
    picked: list[int] = []
    for _ in range(n):
        i = int(np.argmax(far))
        picked.append(i)
        far = np.minimum(far, 1.0 - x @ x[i])
        far[picked] = -np.inf
    return np.asarray(picked, np.int64)


def _mmr(vectors: np.ndarray, score: np.ndarray, n: int, lam: float) -> np.ndarray:
    """Maximal marginal relevance: each pick maximises ``lam * score - (1 - lam) * (its
    greatest cosine similarity to the picks before it)``, scores scaled to [0, 1]."""
    x = np.asarray(vectors, np.float64)
    s = np.asarray(score, np.float64)
    spread = s.max() - s.min()
    s = (s - s.min()) / spread if spread > 0 else np.zeros_like(s)
    nearest = np.zeros(len(s))
    picked: list[int] = []
    for _ in range(n):
        value = lam * s - (1 - lam) * nearest
        value[picked] = -np.inf
        i = int(np.argmax(value))
        picked.append(i)
        nearest = np.maximum(nearest, x @ x[i])
    return np.asarray(picked, np.int64)


def _suggestions(
    memory: ExternalContinualLearner,
    chosen: _Scored,
    ids: Sequence[str],
    items: Sequence[str | Image],
    options: SuggestOptions,
) -> list[Suggestion]:
    near = _nearest_examples(memory, chosen.vectors, options.neighbours)
    counts, col = memory.stats.counts, memory.stats.col
    out = []
    for rank, row in enumerate(range(len(chosen.score)), 1):
        pred = chosen.predictions[row]
        asked = _in_question(pred, bool(memory.multi_label))
        rare = chosen.rare[row]
        if rare is not None:
            asked = {**asked, rare: 0.0}
        label_counts = {lab: int(counts[col[lab]]) if lab in col else 0 for lab in asked}
        item = items[int(chosen.positions[row])]
        out.append(
            Suggestion(
                id=ids[int(chosen.positions[row])],
                rank=rank,
                strategy=options.strategy,
                score=round(float(chosen.score[row]), 6),
                reason=_reason(options, chosen, row, asked, label_counts, rare),
                margin=round(float(chosen.margin[row]), 6),
                entropy=round(float(chosen.entropy[row]), 6),
                set_size=len(pred.set or ()),
                labels={lab: round(p, 6) for lab, p in asked.items()},
                counts=label_counts,
                nearest=near[row],
                text=item if isinstance(item, str) else "",
            )
        )
    return out


def _in_question(pred: Prediction, multi: bool) -> dict[str, float]:
    """The labels a labeller has to decide between: the conformal set, at least the two most
    probable labels and at most five (multi-label: the three nearest to probability 0.5)."""
    probs = _sorted_probabilities(pred)
    if multi:
        return dict(sorted(probs, key=lambda kv: abs(kv[1] - 0.5))[:3])
    n = min(max(len(pred.set or ()), 2), 5)
    return dict(probs[:n])


def _nearest_examples(
    memory: ExternalContinualLearner, vectors: np.ndarray, n: int
) -> list[tuple[Neighbour, ...]]:
    if n == 0 or len(vectors) == 0:
        return [() for _ in range(len(vectors))]
    sims, rows = memory.neighbours(np.ascontiguousarray(vectors, np.float32), n)
    flat = sorted({int(r) for r in rows.ravel() if r >= 0})
    examples = dict(zip(flat, memory.store.examples(flat), strict=True))
    return [
        tuple(
            Neighbour(
                examples[int(r)].id,
                examples[int(r)].labels,
                round(float(s), 4),
                _short(examples[int(r)].text),
            )
            for s, r in zip(sims_row, rows_row, strict=True)
            if r >= 0
        )
        for sims_row, rows_row in zip(sims, rows, strict=True)
    ]


def _short(text: str) -> str:
    return text if len(text) <= _NEAREST_TEXT_CHARS else text[: _NEAREST_TEXT_CHARS - 1] + "…"


def _listed(asked: dict[str, float]) -> str:
    return ", ".join(f"{lab} ({p:.2f})" for lab, p in asked.items())


def _reason(
    options: SuggestOptions,
    chosen: _Scored,
    row: int,
    asked: dict[str, float],
    counts: dict[str, int],
    rare: str | None,
) -> str:
    """One sentence on why this input was picked."""
    pred = chosen.predictions[row]
    strategy = options.strategy
    if strategy == "random":
        return "random sample (baseline)"
    if strategy == "diversity":
        return (
            f"far from the stored examples (cosine distance {chosen.novelty[row]:.2f} to the "
            "nearest) and from the rest of the batch"
        )
    if rare is not None and strategy in ("coverage", "combined"):
        return f"nearest label description is {rare}, which has no stored example"
    if strategy == "coverage":
        fewest = min(counts, key=lambda lab: counts[lab])
        return f"likely {_listed(asked)}; {fewest} has only {counts[fewest]} stored examples"
    if strategy == "conformal":
        size = len(pred.set or ())
        return f"the {options.confidence:.0%} conformal set holds {size} labels: {_listed(asked)}"
    if strategy == "entropy":
        return f"probability spread over {_listed(asked)} (entropy {chosen.entropy[row]:.2f})"
    if strategy == "expected_change":
        return (
            f"uncertain between {_listed(asked)} (the top two {1 - chosen.margin[row]:.2f} "
            f"apart), and far from their means: learning it would move its label's mean by "
            f"{chosen.change[row]:.3f} (Mahalanobis, expected)"
        )
    text = f"uncertain between {_listed(asked)} (the top two {1 - chosen.margin[row]:.2f} apart)"
    return text + ("; picked unlike the rest of the batch" if strategy == "combined" else "")


def suggestion_row(s: Suggestion) -> dict[str, Any]:
    """A suggestion as a JSON object: a line of ``icl-cl suggest``, an item of ``/v1/suggest``."""
    return {
        "id": s.id,
        "rank": s.rank,
        "text": s.text,
        "strategy": s.strategy,
        "score": s.score,
        "reason": s.reason,
        "uncertainty": {"margin": s.margin, "entropy": s.entropy, "set_size": s.set_size},
        "labels": [
            {"label": lab, "probability": p, "examples": s.counts.get(lab, 0)}
            for lab, p in s.labels.items()
        ],
        "nearest": [
            {"id": n.id, "labels": list(n.labels), "similarity": n.similarity, "text": n.text}
            for n in s.nearest
        ],
    }


__all__ = [
    "STRATEGIES",
    "Classifier",
    "Neighbour",
    "StrategyName",
    "SuggestOptions",
    "Suggestion",
    "suggest",
    "suggest_from",
    "suggestion_row",
]
