"""Calibration: scores to probabilities you can threshold, and conformal label sets."""

from __future__ import annotations

from icl_cl.calibration.conformal import SplitConformal
from icl_cl.calibration.probability import PlattScaling, TemperatureScaling

__all__ = ["PlattScaling", "SplitConformal", "TemperatureScaling"]
