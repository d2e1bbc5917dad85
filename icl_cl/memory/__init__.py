"""The external continual learner (ECL): running label statistics, scorers, example index, store."""

from __future__ import annotations

from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.store import Store

__all__ = ["ExternalContinualLearner", "Store"]
