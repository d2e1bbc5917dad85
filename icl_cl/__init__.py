"""icl_cl: in-context continual classification.

An external continual learner narrows a growing label set to a few candidates with
demonstrations; a language model that is never fine-tuned reads them in context.
"""

from __future__ import annotations

from icl_cl._version import __version__
from icl_cl.classifier import ContinualClassifier
from icl_cl.config import ClassifierConfig, EmbedderConfig, MemoryConfig
from icl_cl.errors import (
    ConfigError,
    DataError,
    IclClError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
)
from icl_cl.heads import FittedHeads, HeadSpec
from icl_cl.types import (
    Candidate,
    Cost,
    Evidence,
    Example,
    Fallback,
    FallbackReason,
    Label,
    LabelSetEvidence,
    LearnReport,
    Prediction,
)

__all__ = [
    "Candidate",
    "ClassifierConfig",
    "ConfigError",
    "ContinualClassifier",
    "Cost",
    "DataError",
    "EmbedderConfig",
    "Evidence",
    "Example",
    "Fallback",
    "FallbackReason",
    "FittedHeads",
    "HeadSpec",
    "IclClError",
    "Label",
    "LabelSetEvidence",
    "LearnReport",
    "MemoryConfig",
    "Prediction",
    "StoreBusyError",
    "StoreCorruptError",
    "StoreError",
    "__version__",
]
