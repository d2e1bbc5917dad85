"""Choosing a multi-label prediction's label set from its candidates' calibrated probabilities.

Three rules, each choosing at least the most probable candidate (a prediction without labels is
an abstention, decided elsewhere):

- ``cardinality``: the top ``n``, ``n`` the expected label count (from the nearest stored
  examples);
- ``threshold``: every candidate whose probability is at least one global threshold;
- ``label_thresholds``: the same with a threshold per label, each the one that maximised the
  label's F1 on held-out stored examples, shrunk towards a global threshold that maximised
  micro-F1 over all held-out (item, candidate) pairs.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from icl_cl.config import LABEL_SET_RULES
from icl_cl.types import LabelSetEvidence

# Shrinkage strength, in held-out positives: a label's threshold is the mean of its own best
# threshold, weighted by its positives n, and the global one, weighted by this. The best-F1
# threshold of a label with a handful of positives lands wherever those few probabilities
# happen to fall (with one positive it sits just below it, however low), so it is noise; with
# many positives it is the label's real operating point. n / (n + 5) moves smoothly from the
# first to the second, with no cliff at some count, and is half the label's own at 5 positives.
PRIOR_POSITIVES = 5.0


@dataclass(frozen=True)
class LabelSetRule:
    """A rule choosing a label set; ``label_thresholds`` holds fitted per-label thresholds.

    Attributes:
        rule: ``cardinality``, ``threshold`` or ``label_thresholds``.
        threshold: The global threshold (fitted, for ``label_thresholds``); labels without their
            own threshold use it.
        label_thresholds: Fitted threshold per label seen as a gold candidate in held-out data.
        heldout_items: Held-out items the thresholds were fitted on (0: not fitted).
    """

    rule: str = "cardinality"
    threshold: float = 0.5
    label_thresholds: Mapping[str, float] = field(default_factory=dict)
    heldout_items: int = 0

    def __post_init__(self) -> None:
        if self.rule not in LABEL_SET_RULES:
            raise ValueError(
                f"unknown label-set rule {self.rule!r} (one of {', '.join(LABEL_SET_RULES)})"
            )

    @classmethod
    def fit(
        cls,
        probabilities: Sequence[np.ndarray],
        labels: Sequence[Sequence[str]],
        gold: Sequence[Collection[str]],
        default: float = 0.5,
    ) -> LabelSetRule:
        """Fit per-label thresholds (rule ``label_thresholds``) on held-out items.

        Args:
            probabilities: Per item, its candidates' calibrated probabilities.
            labels: Per item, its candidate labels (aligned with ``probabilities``).
            gold: Per item, its gold labels; those outside its candidates count as misses.
            default: The global threshold when no held-out candidate is gold.

        The thresholds are fitted as if each held-out item took exactly the candidates that
        clear them (the "at least the top one" rule is left out of the fit).
        """
        p = np.concatenate([np.asarray(x, np.float64) for x in probabilities] or [np.zeros(0)])
        names = np.array([lab for cands in labels for lab in cands], dtype=object)
        y = np.array(
            [lab in g for cands, g in zip(labels, gold, strict=True) for lab in cands], dtype=bool
        )
        missed = [
            lab for cands, g in zip(labels, gold, strict=True) for lab in g if lab not in cands
        ]
        best = _best_threshold(p, y, len(missed))
        overall = default if best is None else best
        own: dict[str, float] = {}
        for label in sorted(set(names[y].tolist())):
            mask = names == label
            t = _best_threshold(p[mask], y[mask], missed.count(label))
            assert t is not None  # the label is gold somewhere among its candidates
            n = float(y[mask].sum())
            own[label] = (n * t + PRIOR_POSITIVES * overall) / (n + PRIOR_POSITIVES)
        return cls("label_thresholds", overall, own, len(probabilities))

    def threshold_for(self, label: str) -> float:
        return self.label_thresholds.get(label, self.threshold)

    def choose(
        self, labels: Sequence[str], probabilities: np.ndarray, cardinality: float = 1.0
    ) -> tuple[int, ...]:
        """Positions of the chosen candidates, most probable first (ties keep the given order,
        so pass the candidates ranked to break ties your way); at least the top one."""
        p = np.asarray(probabilities, np.float64)
        order = np.argsort(-p, kind="stable")
        if len(order) == 0:
            return ()
        if self.rule == "cardinality":
            n = max(1, min(len(order), round(float(cardinality))))
            return tuple(int(j) for j in order[:n])
        passing = tuple(int(j) for j in order if p[j] >= self.threshold_for(labels[j]))
        return passing or (int(order[0]),)

    def evidence(self, chosen: Sequence[str]) -> LabelSetEvidence:
        """The rule, and the threshold(s) the chosen labels were held to."""
        if self.rule == "cardinality":
            return LabelSetEvidence(self.rule)
        if self.rule == "threshold":
            return LabelSetEvidence(self.rule, threshold=self.threshold)
        return LabelSetEvidence(
            self.rule, thresholds={lab: self.threshold_for(lab) for lab in chosen}
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "threshold": round(float(self.threshold), 8),
            "label_thresholds": {k: round(float(v), 8) for k, v in self.label_thresholds.items()},
            "heldout_items": self.heldout_items,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelSetRule:
        return cls(
            str(data["rule"]),
            float(data["threshold"]),
            {str(k): float(v) for k, v in data["label_thresholds"].items()},
            int(data["heldout_items"]),
        )


def _best_threshold(p: np.ndarray, gold: np.ndarray, missed: int) -> float | None:
    """The threshold ``t`` (choose ``p >= t``) with the best F1 over these (probability, is
    gold) pairs, ``missed`` more gold labels counting as misses; ``None`` when none is gold.

    ``t`` lies halfway between the lowest chosen probability and the next one down, so an
    unseen probability near either stays on the side its neighbour was put on.
    """
    if not gold.any():
        return None
    order = np.argsort(-p, kind="stable")
    p, gold = p[order], gold[order]
    tp = np.cumsum(gold)
    # Choosing the top i + 1: F1 = 2 TP / (chosen + gold) = 2 TP / ((i + 1) + positives).
    f1 = 2 * tp / (np.arange(1, len(p) + 1) + gold.sum() + missed)
    # A threshold cannot split equal probabilities: only cut after the last of each run.
    f1[:-1][p[1:] == p[:-1]] = -1.0
    i = int(np.argmax(f1))  # the first best: the highest threshold among equals
    return float((p[i] + p[i + 1]) / 2) if i + 1 < len(p) else float(p[i])
