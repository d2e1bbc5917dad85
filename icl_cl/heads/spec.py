"""What a fit of the heads depends on, as one typed value; its digest keys the stored fit."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from icl_cl.config import (
    CalibrationConfig,
    ClassifierConfig,
    DecisionConfig,
    FusionConfig,
    IRRConfig,
    LLMConfig,
    MemoryConfig,
    PromptConfig,
)

# Part of every digest: bump it when what is fitted changes form (stored fits are then refitted).
HEADS_VERSION = 1


@dataclass(frozen=True)
class HeadSpec:
    """Everything that changes the held-out scores the heads are fitted on.

    Attributes:
        k: Candidates per input.
        scorer: The ECL scorer that ranks them (resolved: never ``auto``).
        reads: The LLM reads each input's candidates, and its scores are a fusion source.
        llm: The LLM, when it reads or writes Infer-Retrieve-Rank queries; else ``None``.
        prompt: The prompt strategy, when the LLM reads; else ``None``.
        memory: The ECL's hyper-parameters.
        fusion: Held-out size and seed of the fusion weights (the seed draws every held-out set).
        calibration: In-context calibration, probability calibration and held-out sizes.
        decision: The multi-label label-set rule.
        irr: Infer-Retrieve-Rank, when it supplies the candidates.
    """

    k: int
    scorer: str
    reads: bool
    llm: LLMConfig | None
    prompt: PromptConfig | None
    memory: MemoryConfig
    fusion: FusionConfig
    calibration: CalibrationConfig
    decision: DecisionConfig
    irr: IRRConfig | None

    @classmethod
    def of(cls, config: ClassifierConfig, k: int, scorer: str, *, use_llm: bool) -> HeadSpec:
        """The spec of predictions made with ``config``, ``k`` candidates and ``scorer``; with
        ``use_llm`` the configured LLM reads them (when there is one and it has a reading step)."""
        reads = use_llm and config.llm is not None and (config.irr is None or config.irr.rank)
        infers = config.irr is not None and config.irr.infer and config.llm is not None
        return cls(
            k=k,
            scorer=scorer,
            reads=reads,
            llm=config.llm if reads or infers else None,
            prompt=config.prompt if reads else None,
            memory=config.memory,
            fusion=config.fusion,
            calibration=config.calibration,
            decision=config.decision,
            irr=config.irr,
        )

    @property
    def infers(self) -> bool:
        """Candidates come with an LLM infer step (Infer-Retrieve-Rank): every held-out item
        costs an LLM generation."""
        return self.irr is not None and self.irr.infer and self.llm is not None

    def to_dict(self) -> dict[str, Any]:
        def dump(value: Any) -> Any:
            return value.model_dump(mode="json") if value is not None else None

        return {
            "k": self.k,
            "scorer": self.scorer,
            "reads": self.reads,
            "llm": dump(self.llm),
            "prompt": dump(self.prompt),
            "memory": dump(self.memory),
            "fusion": dump(self.fusion),
            "calibration": dump(self.calibration),
            "decision": dump(self.decision),
            "irr": dump(self.irr),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadSpec:
        def load(model: Any, value: Any) -> Any:
            return model.model_validate(value) if value is not None else None

        return cls(
            k=int(data["k"]),
            scorer=str(data["scorer"]),
            reads=bool(data["reads"]),
            llm=load(LLMConfig, data["llm"]),
            prompt=load(PromptConfig, data["prompt"]),
            memory=MemoryConfig.model_validate(data["memory"]),
            fusion=FusionConfig.model_validate(data["fusion"]),
            calibration=CalibrationConfig.model_validate(data["calibration"]),
            decision=DecisionConfig.model_validate(data["decision"]),
            irr=load(IRRConfig, data["irr"]),
        )

    @property
    def digest(self) -> str:
        """A short digest of the spec: the key its fit is stored under."""
        text = json.dumps([HEADS_VERSION, self.to_dict()], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line for messages: ``k=10, scorer=mahalanobis, LLM smollm2 (transformers)``."""
        reader = f"LLM {self.llm.model} ({self.llm.backend})" if self.reads and self.llm else "ECL"
        return f"k={self.k}, scorer={self.scorer}, {reader}"
