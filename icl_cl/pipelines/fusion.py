"""Fusion of ECL and LLM candidate scores: ``z = a * ecl + b * llm``, fitted on held-out data.

The weights maximise the likelihood of the gold label under a softmax over each input's
candidates (a conditional logit, which also calibrates the scale of the scores). The LLM is then
kept only if cross-fitted fused decisions beat the ECL alone on the held-out items by more than
noise; otherwise its weight is 0, so a weak model never makes the classifier worse than its ECL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class FusionWeights:
    """Fitted fusion weights and the held-out evidence behind them."""

    ecl: float
    llm: float
    heldout_items: int
    heldout_ecl: float
    heldout_llm: float
    heldout_fused: float

    @property
    def uses_llm(self) -> bool:
        return self.llm > 0

    def combine(self, ecl: np.ndarray, llm: np.ndarray | None) -> np.ndarray:
        """Fused scores; where the LLM gave nothing (``None`` or ``-inf``) the ECL order stands."""
        if llm is None or not self.uses_llm:
            return self.ecl * ecl
        llm = np.where(
            np.isfinite(llm), llm, np.nanmin(np.where(np.isfinite(llm), llm, np.nan)) - 10
        )
        return self.ecl * ecl + self.llm * llm

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _nll(params: np.ndarray, ecl: np.ndarray, llm: np.ndarray, target: np.ndarray) -> float:
    z = params[0] * ecl + params[1] * llm
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-(target * logp).sum(axis=1).mean())


def _standardise(x: np.ndarray) -> tuple[np.ndarray, float]:
    scale = float(np.std(x - x.mean(axis=1, keepdims=True))) or 1.0
    return x / scale, scale


def _fit(e: np.ndarray, m: np.ndarray, target: np.ndarray, use_llm: bool) -> np.ndarray:
    from scipy.optimize import minimize

    bounds = [(0.0, 50.0), (0.0, 50.0 if use_llm else 0.0)]
    x0 = np.array([1.0, 1.0 if use_llm else 0.0])
    return minimize(_nll, x0=x0, args=(e, m, target), bounds=bounds, method="L-BFGS-B").x


def _correct(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    return target[np.arange(len(scores)), scores.argmax(axis=1)] > 0


# One-sided sign test at about 5%: the LLM must win clearly more items than it loses.
_Z = 1.645


def fit_fusion(
    ecl: Sequence[np.ndarray], llm: Sequence[np.ndarray], gold: Sequence[set[int]]
) -> FusionWeights:
    """Fit ``a, b >= 0`` on held-out items, and keep the LLM only if it helps beyond noise.

    The decision is made on cross-fitted predictions (weights fitted on one half, judged on the
    other, and back), comparing fused and ECL-alone decisions item by item with a sign test.

    Args:
        ecl: Per item, ECL scores of its ``k`` candidates.
        llm: Per item, LLM scores of the same candidates (``-inf`` where a candidate was dropped).
        gold: Per item, positions of gold labels among the candidates (may be empty).
    """
    rows = [i for i, g in enumerate(gold) if g and np.all(np.isfinite(llm[i]))]
    if len(rows) < 10:
        return FusionWeights(1.0, 0.0, len(rows), float("nan"), float("nan"), float("nan"))
    e = np.stack([ecl[i] for i in rows]).astype(np.float64)
    m = np.stack([llm[i] for i in rows]).astype(np.float64)
    target = np.zeros_like(e)
    for r, i in enumerate(rows):
        target[r, list(gold[i])] = 1.0 / len(gold[i])
    e_std, e_scale = _standardise(e)
    m_std, m_scale = _standardise(m)
    halves = [np.arange(len(rows)) % 2 == 0, np.arange(len(rows)) % 2 == 1]
    fused_correct = np.zeros(len(rows), dtype=bool)
    for fit_on, judge in (halves, halves[::-1]):
        a, b = _fit(e_std[fit_on], m_std[fit_on], target[fit_on], use_llm=True)
        fused_correct[judge] = _correct(a * e_std[judge] + b * m_std[judge], target[judge])
    ecl_correct = _correct(e, target)
    wins = int(np.sum(fused_correct & ~ecl_correct))
    losses = int(np.sum(~fused_correct & ecl_correct))
    trusted = wins - losses > _Z * np.sqrt(max(wins + losses, 1))
    a, b = _fit(e_std, m_std, target, use_llm=trusted)
    if not trusted:
        b = 0.0  # the LLM does not earn its place: the ECL alone, with its scale calibrated
    return FusionWeights(
        ecl=float(a) / e_scale,
        llm=float(b) / m_scale,
        heldout_items=len(rows),
        heldout_ecl=float(ecl_correct.mean()),
        heldout_llm=float(_correct(m, target).mean()),
        heldout_fused=float(fused_correct.mean()),
    )
