"""What a method gives back for one stage: decisions, their cost, and what every method needs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from icl_cl.classifier import ContinualClassifier
from icl_cl.evaluation.llm_pool import BackendPool
from icl_cl.reading import Reading
from icl_cl.types import Prediction, Progress

# Items read per LLM batch: small enough for a smooth progress bar, large enough to batch.
CHUNK = 32


@dataclass(frozen=True)
class Decision:
    """One item's answer: the decided labels and a ranking of labels with their scores, plus
    calibrated probabilities (aligned with ``ranking``) and a conformal set when the method
    gives them."""

    labels: tuple[str, ...]
    ranking: tuple[str, ...]
    scores: tuple[float, ...]
    probabilities: tuple[float, ...] | None = None
    set: tuple[str, ...] | None = None

    @classmethod
    def from_prediction(cls, pred: Prediction) -> Decision:
        return cls(
            pred.labels,
            tuple(c.label for c in pred.candidates),
            tuple(c.score for c in pred.candidates),
            tuple(pred.scores[c.label] for c in pred.candidates),
            pred.set,
        )

    @classmethod
    def from_scores(cls, labels: Sequence[str], scores: np.ndarray, n_chosen: int) -> Decision:
        """Rank by score (ties keep the given order) and decide the top ``n_chosen``."""
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
        ranking = tuple(labels[j] for j in order)
        return cls(ranking[: max(1, n_chosen)], ranking, tuple(float(scores[j]) for j in order))


@dataclass
class Cost:
    """LLM work summed over a stage's items (cache hits count: they are the method's cost)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fallbacks: int = 0
    shortened: int = 0

    def count(self, reading: Reading) -> None:
        """Add one reading's prompt (with any calibration stand-ins read beside it)."""
        if reading.prompt is not None:
            self.calls += 1
            self.prompt_tokens += reading.prompt.tokens + reading.calibration_tokens
            self.shortened += reading.prompt.shortened is not None

    def count_prediction(self, pred: Prediction) -> None:
        """Add the LLM work a prediction reports (every step of its pipeline)."""
        if pred.cost is not None:
            self.calls += pred.cost.calls
            self.prompt_tokens += pred.cost.prompt_tokens
            self.completion_tokens += pred.cost.completion_tokens
            # Fusion giving the LLM weight 0 is a decision, not a failure to read.
            weights = pred.evidence.fusion_weights
            weighted = weights is None or weights.get("llm", 1.0) > 0
            self.fallbacks += pred.fallback is not None and weighted
            self.shortened += pred.evidence.shortened is not None


@dataclass
class MethodOutput:
    """Decisions of a method on one stage's test items, with its cost.

    Attributes:
        decisions: The method's decisions, aligned with the test items.
        variants: Other decisions the same work gave for free, scored as extra metrics with
            the key as prefix (``llm``: the LLM's own choice; ``ecl``: the ECL on these items).
        cost: LLM work for the test items.
        setup: One-off work of the stage (e.g. fitting fusion weights), not per item.
        full_scores: Scores of every label (ECL scorers only), for mAP.
    """

    decisions: list[Decision]
    variants: dict[str, list[Decision]] = field(default_factory=dict)
    cost: Cost = field(default_factory=Cost)
    setup: dict[str, float] = field(default_factory=dict)
    full_scores: np.ndarray | None = None


@dataclass
class StageContext:
    """What every method needs to evaluate one stage (``score_llm_alone``: see
    :class:`~icl_cl.evaluation.protocol.EvalConfig`)."""

    classifier: ContinualClassifier
    pool: BackendPool
    multi_label: bool
    mean_cardinality: float
    k: int
    progress: Callable[[int], None] = lambda n: None
    confidence: float | None = None
    fit_progress: Progress | None = None
    score_llm_alone: bool = True


def chunks(n: int) -> list[slice]:
    return [slice(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]
