"""The fitted heads of one :class:`HeadSpec`: fusion weights, probability calibration (with its
conformal scores) and the label-set rule, fitted together on held-out stored examples, stored
together, and applied together by :meth:`FittedHeads.decide`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from icl_cl.heads.calibrator import ScoreCalibrator
from icl_cl.heads.fusion import FUSED, FusionWeights, fit_fusion
from icl_cl.heads.heldout import HeldOutScores, HeldOutSource
from icl_cl.heads.label_sets import LabelSetRule
from icl_cl.heads.spec import HeadSpec
from icl_cl.types import Candidate, Evidence, Fallback, FallbackReason, Prediction, Upstream

logger = logging.getLogger(__name__)

# The score sources of today's classifier: the ECL ranks the candidates, the LLM reads them.
SOURCES = ("ecl", "llm")


# A fit serves as current until the store has grown by this factor since it was made: the heads
# (fusion weights, temperature, conformal quantile, label-set rule) are fitted on a few thousand
# held-out items and move little with a few percent more, while a refit reads them all again.
REFIT_GROWTH = 1.1


def serves_as_current(fitted_at: int, n_examples: int) -> bool:
    """Whether heads fitted on ``fitted_at`` stored examples serve a store of ``n_examples`` as
    current: the same store, or one grown by less than :data:`REFIT_GROWTH`."""
    return fitted_at <= n_examples < max(REFIT_GROWTH * fitted_at, fitted_at + 1)


@dataclass(frozen=True)
class FittedHeads:
    """Everything fitted on held-out stored examples for one :class:`HeadSpec`.

    Attributes:
        spec: What the fit depends on.
        fusion: The fusion weights (``None`` when the LLM does not read: the ECL decides alone).
        calibrator: Scores to probabilities, and conformal scores.
        rule: The multi-label label-set rule (``None`` for a single-label store).
        heldout_items: Held-out items the calibration was fitted on.
        n_examples: Stored examples when it was fitted (the fit is stale once the store grows).
    """

    spec: HeadSpec
    fusion: FusionWeights | None
    calibrator: ScoreCalibrator
    rule: LabelSetRule | None
    heldout_items: int
    n_examples: int

    @classmethod
    def fit(
        cls,
        spec: HeadSpec,
        heldout: HeldOutSource,
        *,
        multi_label: bool,
        n_examples: int,
        fusion: FusionWeights | None = None,
    ) -> FittedHeads:
        """Fit the fusion weights (when the LLM reads), then the calibration and the label-set
        rule on the decision scores those weights give.

        The fusion reads ``fusion.heldout`` items with the LLM. When the LLM earns weight, the
        calibration reads more (``calibration.heldout_llm``, a superset: a calibration fitted on
        a hundred read items missed ECE 0.05 on Debian sections); otherwise it needs no LLM and
        fits on ``calibration.heldout`` items scored by the ECL (fewer when each costs an LLM
        generation, as with Infer-Retrieve-Rank's infer step).

        Args:
            spec: What to fit for.
            heldout: Held-out items' scores.
            multi_label: Whether the store is multi-label.
            n_examples: Stored examples now.
            fusion: Weights to use instead of fitting them (e.g. the ECL alone while the LLM is
                unreachable).

        Raises:
            BackendError: The LLM could read no held-out item.
        """
        if fusion is None and spec.reads:
            items = heldout.scores(spec.fusion.heldout, read=True)
            fusion = fit_fusion({s: items.sources[s] for s in SOURCES}, items.gold_positions())
            logger.info("fusion weights: %s", fusion)
        if fusion is not None and fusion.uses_added:
            n = max(spec.fusion.heldout, spec.calibration.heldout_llm)
            items = heldout.scores(n, read=True)
            scores = [fusion.combine(items.item_sources(i)) for i in range(len(items))]
        else:
            n = spec.calibration.heldout
            if spec.infers:  # every held-out item costs an LLM generation
                n = min(n, spec.fusion.heldout)
            items = heldout.scores(n, read=False)
            scale = fusion.weights[fusion.base] if fusion is not None else 1.0
            scores = [scale * s for s in items.sources["ecl"]]
        calibrator = ScoreCalibrator.fit(
            scores, items.gold_columns(), multi_label, spec.calibration.probability
        )
        rule = _label_set_rule(spec, items, scores, calibrator) if multi_label else None
        return cls(spec, fusion, calibrator, rule, len(items), n_examples)

    @property
    def llm_weight(self) -> float:
        """The LLM's fusion weight (0 when it does not read)."""
        return self.fusion.weights.get("llm", 0.0) if self.fusion is not None else 0.0

    def llm_fallback(self) -> Fallback | None:
        """Why the LLM is not read for these heads although it would be asked to, if it is not."""
        if self.fusion is None or self.fusion.uses_added:
            return None
        acc = self.fusion.heldout_accuracy
        return Fallback(
            FallbackReason.LLM_WEIGHT_ZERO,
            f"on {self.fusion.heldout_items} held-out stored examples fused "
            f"({acc[FUSED]:.3f}) did not beat the ECL alone ({acc['ecl']:.3f}) beyond noise",
        )

    def decide(
        self,
        candidates: Sequence[Sequence[tuple[str, float]]],
        llm: Sequence[np.ndarray | None] | None = None,
        *,
        cardinality: np.ndarray | None = None,
        upstream: Sequence[Upstream] | None = None,
        confidence: float | None = None,
        abstain_below: float | None = None,
        stale: bool = False,
    ) -> list[Prediction]:
        """Each input's prediction from its ranked ``(label, ECL score)`` candidates.

        Args:
            candidates: Per input, its candidates, best first.
            llm: Per input, the LLM's scores of its candidates (``None`` where it gave none).
            cardinality: Multi-label: per input, the label count expected (``cardinality`` rule).
            upstream: Per input, cost, fallback and evidence of the LLM steps before (``None``:
                no LLM step ran or was asked for; the predictions then carry no cost).
            confidence: Also give a conformal label set at this coverage.
            abstain_below: Abstain when the top probability is below this.
            stale: The heads predate the store's latest sessions (said in the evidence).
        """
        out = []
        for i, cands in enumerate(candidates):
            before = upstream[i] if upstream is not None else None
            scores = llm[i] if llm is not None else None
            card = float(cardinality[i]) if cardinality is not None else 1.0
            out.append(
                self._decide_one(cands, scores, card, before, confidence, abstain_below, stale)
            )
        return out

    def _decide_one(
        self,
        cands: Sequence[tuple[str, float]],
        llm: np.ndarray | None,
        cardinality: float,
        upstream: Upstream | None,
        confidence: float | None,
        abstain_below: float | None,
        stale: bool,
    ) -> Prediction:
        labels = [label for label, _ in cands]
        ecl = np.array([score for _, score in cands], dtype=np.float64)
        fused = self.fusion.combine({"ecl": ecl, "llm": llm}) if self.fusion is not None else ecl
        prob = self.calibrator.probabilities(fused[None, :])[0]
        order = np.lexsort((-fused, -prob))  # probability first; raw score breaks ties
        rule = self.rule
        top = rule.choose([labels[j] for j in order], prob[order], cardinality) if rule else (0,)
        chosen = tuple(labels[order[j]] for j in top)
        conformal = None
        if confidence is not None:
            conformal = tuple(labels[j] for j in self.calibrator.sets(prob[None, :], confidence)[0])
        evidence = dataclasses.replace(
            upstream.evidence if upstream is not None else Evidence(),
            fusion_weights=dict(self.fusion.weights) if self.fusion is not None else None,
            fusion_heldout_items=self.fusion.heldout_items if self.fusion is not None else None,
            expected_cardinality=cardinality if rule is not None else None,
            decision=rule.evidence(chosen) if rule is not None else None,
            p_outside_candidates=None if rule is not None else max(0.0, 1.0 - float(prob.sum())),
            stale_fit=stale,
        )
        abstained = abstain_below is not None and float(prob[order[0]]) < abstain_below
        return Prediction(
            labels=() if abstained else chosen,
            scores={labels[j]: float(prob[j]) for j in order},
            candidates=tuple(
                Candidate(
                    labels[j],
                    float(fused[j]),
                    ecl_score=float(ecl[j]),
                    llm_score=None if llm is None else float(llm[j]),
                    probability=float(prob[j]),
                )
                for j in order
            ),
            scorer=self.spec.scorer,
            fallback=upstream.fallback if upstream is not None else None,
            cost=upstream.cost if upstream is not None else None,
            evidence=evidence,
            set=conformal,
            abstained=abstained,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "fusion": self.fusion.to_dict() if self.fusion is not None else None,
            "calibrator": self.calibrator.to_dict(),
            "rule": self.rule.to_dict() if self.rule is not None else None,
            "heldout_items": self.heldout_items,
            "n_examples": self.n_examples,
        }

    @classmethod
    def from_dict(cls, spec: HeadSpec, data: dict[str, Any]) -> FittedHeads:
        return cls(
            spec,
            FusionWeights.from_dict(data["fusion"]) if data["fusion"] is not None else None,
            ScoreCalibrator.from_dict(data["calibrator"]),
            LabelSetRule.from_dict(data["rule"]) if data["rule"] is not None else None,
            int(data["heldout_items"]),
            int(data["n_examples"]),
        )

    def summary(self, store_size: int) -> dict[str, Any]:
        """What ``info`` shows of this fit."""
        return {
            "spec": self.spec.describe(),
            "digest": self.spec.digest,
            "fusion_weights": dict(self.fusion.weights) if self.fusion is not None else None,
            "fusion_heldout_items": self.fusion.heldout_items if self.fusion else None,
            "llm_earned_weight": self.llm_weight > 0 if self.spec.reads else None,
            "calibration": self.calibrator.to_dict()["kind"],
            "calibration_heldout_items": self.heldout_items,
            "calibration_default": self.calibrator.default_reason,
            "label_set_rule": self.rule.rule if self.rule is not None else None,
            "fitted_at_examples": self.n_examples,
            "stale": not serves_as_current(self.n_examples, store_size),
        }


def _label_set_rule(
    spec: HeadSpec,
    items: HeldOutScores,
    scores: list[np.ndarray],
    calibrator: ScoreCalibrator,
) -> LabelSetRule:
    """The configured rule; ``label_thresholds`` fitted on the calibration's held-out items,
    through the calibrated probabilities."""
    decision = spec.decision
    if decision.rule != "label_thresholds":
        return LabelSetRule(decision.rule, decision.threshold)
    probabilities = [calibrator.probabilities(s[None, :])[0] for s in scores]
    rule = LabelSetRule.fit(
        probabilities, items.labels, [set(g) for g in items.gold], default=decision.threshold
    )
    logger.info("label thresholds fitted on %d held-out items", rule.heldout_items)
    return rule
