"""The ECL's own fit: which scorer (or weighted combination of scorers) ``auto`` stands for, and
the ridge strength of ``ranpac``, both chosen on held-out stored examples and kept in the store.

The choice is made by :func:`icl_cl.heads.scorer_choice_fit.fit_scorer_choice`; this module holds
what is stored and how a combination scores, so the memory layer can apply it without fitting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from icl_cl.memory.scorers import Scorer, fill_unseen

# Where the choice is stored among the store's fitted rows.
CHOICE_KEY = "ecl:scorer_choice"
# Joins the scorers of a combination in its name: ``klda+knn``.
SEPARATOR = "+"
# The choice is made again once the store has this many times the examples it was made on (or
# on ``icl-cl fit --full``): a choice costs O(M^3) (an eigendecomposition, new strengths), so it
# is made O(log n) times, and a session in between costs what it adds.
CHOICE_GROWTH = 2.0


@dataclass(frozen=True)
class ScorerChoice:
    """What ``auto`` resolves to, and why.

    Attributes:
        weights: Weight of each scorer in the combination, the best single scorer first; a
            scorer that did not earn its place has weight 0 (a lone scorer: weight 1).
        ranpac_rho: ``ranpac``'s ridge strength relative to the mean eigenvalue of its Gram
            matrix, chosen on the held-out items (``None``: ranpac was not in the pool).
        heldout_items: Held-out stored items the choice was made on.
        heldout_accuracy: Their top-1 accuracy (RP@5 in a multi-label store) under each scorer
            alone, and under the cross-fitted combination (``fused``).
        n_examples: Stored examples when it was fitted.
        rho_accuracy: Held-out accuracy of ranpac at each strength tried.
        novelty: Where a combination's scorer knows nothing of a label (no example), how many
            standard deviations of its scores above its lowest it counts the label, chosen on
            the held-out items (``None``: no combination).
        widths: The width of each feature scorer's map it uses, chosen on the held-out items
            (see :mod:`~icl_cl.heads.feature_width_fit`); a scorer not named keeps the width
            the store's size gives.
        width_accuracy: Held-out accuracy of each feature scorer at each width tried.
    """

    weights: Mapping[str, float]
    ranpac_rho: float | None
    heldout_items: int
    heldout_accuracy: Mapping[str, float]
    n_examples: int
    rho_accuracy: Mapping[str, float] = field(default_factory=dict)
    novelty: float | None = None
    widths: Mapping[str, int] = field(default_factory=dict)
    width_accuracy: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @property
    def scorer(self) -> str:
        """The name ``auto`` resolves to: one scorer, or the scorers with weight joined by ``+``."""
        return SEPARATOR.join(name for name, w in self.weights.items() if w > 0)

    def reason(self) -> str:
        """One line for ``info``: what was picked, on how many held-out items, against what."""
        acc = self.heldout_accuracy
        others = ", ".join(f"{n} {a:.3f}" for n, a in acc.items() if n != "fused")
        picked = self.scorer
        if SEPARATOR in picked:
            return (
                f"{picked}: their fusion scored {acc['fused']:.3f} on {self.heldout_items} "
                f"held-out stored items (alone: {others})"
            )
        return (
            f"{picked}: best on {self.heldout_items} held-out stored items ({others}); no "
            "other scorer added to it beyond noise"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self.weights),
            # The best scorer first: stored JSON may sort the keys, and the order names the
            # combination (``ranpac+mahalanobis``), which keys its fitted heads.
            "order": list(self.weights),
            "ranpac_rho": self.ranpac_rho,
            "heldout_items": self.heldout_items,
            "heldout_accuracy": dict(self.heldout_accuracy),
            "n_examples": self.n_examples,
            "rho_accuracy": dict(self.rho_accuracy),
            "novelty": self.novelty,
            "widths": dict(self.widths),
            "width_accuracy": {name: dict(acc) for name, acc in self.width_accuracy.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScorerChoice:
        weights = {str(k): float(v) for k, v in data["weights"].items()}
        order = data.get("order", list(weights))
        return cls(
            {name: weights[name] for name in order},
            _optional_float(data["ranpac_rho"]),
            int(data["heldout_items"]),
            {str(k): float(v) for k, v in data["heldout_accuracy"].items()},
            int(data["n_examples"]),
            {str(k): float(v) for k, v in data.get("rho_accuracy", {}).items()},
            _optional_float(data.get("novelty")),
            {str(k): int(v) for k, v in data.get("widths", {}).items()},
            {
                str(name): {str(w): float(a) for w, a in acc.items()}
                for name, acc in data.get("width_accuracy", {}).items()
            },
        )

    def summary(self, store_size: int) -> dict[str, Any]:
        """What ``info`` shows."""
        return {
            "auto": self.scorer,
            "why": self.reason(),
            "weights": dict(self.weights),
            "ranpac_rho": self.ranpac_rho,
            "novelty": self.novelty,
            "feature_widths": dict(self.widths),
            "heldout_items": self.heldout_items,
            "fitted_at_examples": self.n_examples,
            "chosen_again_at_examples": int(CHOICE_GROWTH * self.n_examples),
            "due": self.due(store_size),
        }

    def due(self, n_examples: int) -> bool:
        """Whether a store of ``n_examples`` has outgrown this choice (it is made again)."""
        return not self.n_examples <= n_examples < CHOICE_GROWTH * self.n_examples


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


class Combination:
    """Weighted sum of several scorers' scores (weights include each scorer's scale); a label
    one scorer knows nothing of (no example) counts as that scorer's least likely one, raised by
    ``novelty`` standard deviations of its row (:func:`fill_unseen`): where the scorers have no
    evidence for a described label, its text is all there is, and the fit step measures on
    held-out items what that is worth against a label that has examples and no votes."""

    def __init__(self, parts: Sequence[tuple[Scorer, float]], novelty: float = 0.0) -> None:
        self._parts = list(parts)
        self._novelty = novelty
        self.name = SEPARATOR.join(s.name for s, _ in parts)

    def scores(self, queries: np.ndarray) -> np.ndarray:
        total: np.ndarray | None = None
        for scorer, weight in self._parts:
            filled = fill_unseen(scorer.scores(queries).astype(np.float64), self._novelty)
            total = weight * filled if total is None else total + weight * filled
        assert total is not None
        return total.astype(np.float32)


def combination_parts(name: str) -> list[str]:
    """The scorers a (possibly combined) scorer name stands for."""
    return name.split(SEPARATOR)


def weights_of(choice: ScorerChoice | None, name: str) -> dict[str, float]:
    """The weights of combination ``name``: the stored choice's when it is that combination."""
    parts = combination_parts(name)
    if choice is None or choice.scorer != name:
        raise KeyError(f"no fitted weights for the combination {name!r}")
    return {part: choice.weights[part] for part in parts}
