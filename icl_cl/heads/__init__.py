"""What is fitted on held-out stored examples: fusion of score sources, scores to probabilities,
conformal sets and label-set rules; one fit and one decide, keyed by a typed spec."""

from __future__ import annotations

from icl_cl.heads.calibrator import ScoreCalibrator
from icl_cl.heads.conformal import SplitConformal
from icl_cl.heads.fitted import FittedHeads
from icl_cl.heads.fusion import FusionWeights, fit_fusion
from icl_cl.heads.heldout import HeldOutScores, StoreHeldOutSource
from icl_cl.heads.kept_heads import KeptHeads
from icl_cl.heads.label_sets import LabelSetRule
from icl_cl.heads.probability import PlattScaling, TemperatureScaling
from icl_cl.heads.spec import HeadSpec

__all__ = [
    "FittedHeads",
    "FusionWeights",
    "HeadSpec",
    "HeldOutScores",
    "KeptHeads",
    "LabelSetRule",
    "PlattScaling",
    "ScoreCalibrator",
    "SplitConformal",
    "StoreHeldOutSource",
    "TemperatureScaling",
    "fit_fusion",
]
