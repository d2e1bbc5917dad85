"""Fusion of score sources over each input's candidates: ``z = sum_s w_s * score_s``, fitted on
held-out data.

The first source is the base (the ECL, which ranked the candidates); every other source (the
LLM's reading, another scorer) scores the same candidates. The weights maximise the likelihood
of the gold label under a softmax over each input's candidates (a conditional logit, which also
calibrates the scale of the scores). An added source is then kept only if cross-fitted fused
decisions of the base and that source beat the base alone on the held-out items by more than
noise; otherwise its weight is 0, so a weak model never makes the classifier worse than its ECL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Held-out items (with a gold candidate and every source's scores) needed to fit any weight.
MIN_ITEMS = 10
# One-sided sign test at about 5%: the added source must win clearly more items than it loses.
_Z = 1.645
# Largest weight of a standardised source.
_MAX_WEIGHT = 50.0
# The accuracy key of the cross-fitted fusion of every source.
FUSED = "fused"
# The accuracy key of the cross-fitted fusion of the sources kept (the base's own with none).
KEPT = "kept"


@dataclass(frozen=True)
class FusionWeights:
    """Fitted fusion weights and the held-out evidence behind them.

    Attributes:
        weights: Weight of each source, the base first; 0 for a source that did not earn one.
        heldout_items: Held-out items the weights were fitted on.
        heldout_accuracy: Top-1 accuracy (or RP@depth) on those items of each source alone, and of the
            cross-fitted fusion of them all (``fused``); NaN when nothing was fitted.
    """

    weights: Mapping[str, float]
    heldout_items: int
    heldout_accuracy: Mapping[str, float]

    @classmethod
    def base_only(cls, names: Sequence[str], heldout_items: int = 0) -> FusionWeights:
        """Weight 1 on the first source and 0 on the others, fitted on nothing."""
        return cls(
            {name: 1.0 if i == 0 else 0.0 for i, name in enumerate(names)},
            heldout_items,
            {name: float("nan") for name in [*names, FUSED]},
        )

    @property
    def base(self) -> str:
        return next(iter(self.weights))

    def uses(self, name: str) -> bool:
        """Whether the source ``name`` has weight in the decision."""
        return self.weights.get(name, 0.0) > 0

    @property
    def uses_added(self) -> bool:
        """Whether any source besides the base has weight."""
        return any(self.uses(name) for name in self.weights if name != self.base)

    def combine(self, scores: Mapping[str, np.ndarray | None]) -> np.ndarray:
        """Fused scores; a source with no weight or no scores (``None``) is left out, and where a
        source gave nothing (``-inf``) it counts as 10 below its lowest score, so the others'
        order stands."""
        fused = self.weights[self.base] * scores[self.base]
        for name, weight in self.weights.items():
            values = scores.get(name)
            if name == self.base or values is None or weight <= 0:
                continue
            finite = np.isfinite(values)
            values = np.where(finite, values, np.nanmin(np.where(finite, values, np.nan)) - 10)
            fused = fused + weight * values
        return fused

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self.weights),
            "heldout_items": self.heldout_items,
            "heldout_accuracy": dict(self.heldout_accuracy),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FusionWeights:
        return cls(
            {str(k): float(v) for k, v in data["weights"].items()},
            int(data["heldout_items"]),
            {str(k): float(v) for k, v in data["heldout_accuracy"].items()},
        )


def _nll(params: np.ndarray, sources: list[np.ndarray], target: np.ndarray) -> float:
    z = params[0] * sources[0]
    for weight, x in zip(params[1:], sources[1:], strict=True):
        z = z + weight * x
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-(target * logp).sum(axis=1).mean())


def _standardise(x: np.ndarray) -> tuple[np.ndarray, float]:
    scale = float(np.std(x - x.mean(axis=1, keepdims=True))) or 1.0
    return x / scale, scale


def _fit(sources: list[np.ndarray], target: np.ndarray, free: Sequence[bool]) -> np.ndarray:
    """Weights maximising the likelihood; a source that is not ``free`` keeps weight 0."""
    from scipy.optimize import minimize

    bounds = [(0.0, _MAX_WEIGHT if f else 0.0) for f in free]
    x0 = np.array([1.0 if f else 0.0 for f in free])
    return minimize(_nll, x0=x0, args=(sources, target), bounds=bounds, method="L-BFGS-B").x


def _quality(scores: np.ndarray, target: np.ndarray, depth: int) -> np.ndarray:
    """Per item, the gold candidates among the top ``depth`` over as many as could be there
    (``depth`` 1: whether the top candidate is gold; 5: RP@5)."""
    if depth == 1:
        return (target[np.arange(len(scores)), scores.argmax(axis=1)] > 0).astype(np.float64)
    depth = min(depth, scores.shape[1])
    top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
    hits = (np.take_along_axis(target, top, axis=1) > 0).sum(axis=1)
    return hits / np.minimum(depth, (target > 0).sum(axis=1))


def _cross_fitted_quality(sources: list[np.ndarray], target: np.ndarray, depth: int) -> np.ndarray:
    """Per item, the :func:`_quality` of the fusion of ``sources`` (every weight free) fitted on
    the other half of the items."""
    halves = [np.arange(len(target)) % 2 == 0, np.arange(len(target)) % 2 == 1]
    quality = np.zeros(len(target))
    for fit_on, judge in (halves, halves[::-1]):
        w = _fit([x[fit_on] for x in sources], target[fit_on], [True] * len(sources))
        fused = w[0] * sources[0][judge]
        for weight, x in zip(w[1:], sources[1:], strict=True):
            fused = fused + weight * x[judge]
        quality[judge] = _quality(fused, target[judge], depth)
    return quality


def fit_fusion(
    sources: Mapping[str, Sequence[np.ndarray]], gold: Sequence[set[int]], depth: int = 1
) -> FusionWeights:
    """Fit ``w_s >= 0`` on held-out items, and keep each added source only if it helps beyond
    noise.

    Sources join the base one at a time (:func:`_forward_selection`), each judged on
    cross-fitted predictions (weights fitted on one half of the items, judged on the other, and
    back) against those of the sources already kept, item by item with a sign test, and it must
    win in each half too. With one added source (the LLM) that is the base against the base and
    the source. The final weights are fitted on every item, the sources that did not earn their
    place held at 0.

    Args:
        sources: Per source (the base first), per item, the scores of the item's ``k``
            candidates (``-inf`` where a candidate was dropped).
        gold: Per item, positions of gold labels among the candidates (may be empty).
        depth: What an item's decision is judged on: its top candidate (1), or the gold share
            of its top ``depth`` (RP@depth: a ranking of several labels, as in tagging).
    """
    names = list(sources)
    rows = [
        i
        for i, g in enumerate(gold)
        if g and all(np.all(np.isfinite(sources[name][i])) for name in names)
    ]
    if len(rows) < MIN_ITEMS:
        return FusionWeights.base_only(names, len(rows))
    raw = [np.stack([sources[name][i] for i in rows]).astype(np.float64) for name in names]
    target = np.zeros_like(raw[0])
    for r, i in enumerate(rows):
        target[r, list(gold[i])] = 1.0 / len(gold[i])
    standardised, scales = zip(*(_standardise(x) for x in raw), strict=True)
    std = list(standardised)
    trusted, kept_quality = _forward_selection(std, target, depth, _quality(raw[0], target, depth))
    # What fusing every source scores (reported even where a source was not kept).
    fused_quality = kept_quality if all(trusted) else _cross_fitted_quality(std, target, depth)
    # Sources that did not earn their place keep weight 0: with none, this is the base alone
    # with its scale calibrated.
    fitted = _fit(std, target, trusted)
    weights = {
        name: float(w) / scale if ok else 0.0
        for name, w, scale, ok in zip(names, fitted, scales, trusted, strict=True)
    }
    accuracy = {
        name: float(_quality(x, target, depth).mean()) for name, x in zip(names, raw, strict=True)
    }
    accuracy[FUSED] = float(fused_quality.mean()) if len(names) > 1 else accuracy[names[0]]
    accuracy[KEPT] = float(kept_quality.mean())
    return FusionWeights(weights, len(rows), accuracy)


def _forward_selection(
    std: list[np.ndarray], target: np.ndarray, depth: int, base_quality: np.ndarray
) -> tuple[list[bool], np.ndarray]:
    """Which sources join the base, one at a time: each round, every source not yet kept is
    fused (cross-fitted) with those kept, and the one that beats them by most is kept if it
    wins beyond noise, overall and in each half of the items: on a small store one lucky half
    must not hand the LLM a weight that costs accuracy on new inputs. Returns the kept flags
    and the per-item quality of the kept fusion (the base's own with none)."""
    trusted = [True] + [False] * (len(std) - 1)
    current = base_quality
    halves = np.arange(len(target)) % 2
    while True:
        best, best_margin, best_quality = None, 0.0, current
        for s in (i for i, ok in enumerate(trusted) if not ok):
            quality = _cross_fitted_quality(
                [x for x, ok in zip(std, trusted, strict=True) if ok] + [std[s]], target, depth
            )
            win, loss = quality > current, quality < current
            wins, losses = int(np.sum(win)), int(np.sum(loss))
            each_half = all(np.sum(win[halves == h]) > np.sum(loss[halves == h]) for h in (0, 1))
            margin = wins - losses - _Z * np.sqrt(max(wins + losses, 1))
            if each_half and margin > best_margin:
                best, best_margin, best_quality = s, margin, quality
        if best is None:
            return trusted, current
        trusted[best], current = True, best_quality
