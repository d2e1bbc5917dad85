"""What ``icl-cl info`` and ``icl-cl labels`` show about a classifier's store, and one prediction
as a JSON object (:class:`PredictionRow`: a line of ``icl-cl predict``, an item of
``/v1/predict``, a record of a distributed predict)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from icl_cl.config import ClassifierConfig
from icl_cl.heads import KeptHeads
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.forgetting import edits
from icl_cl.types import Fallback, Prediction


def label_table(memory: ExternalContinualLearner) -> list[dict[str, Any]]:
    """Known labels with their example counts and the session that introduced them."""
    sessions = memory.store.label_sessions()
    counts = memory.stats.counts
    return [
        {
            "label": lab.label,
            "name": lab.name,
            "group": lab.group,
            "count": int(counts[i]),
            "session": sessions.get(lab.label),
        }
        for i, lab in enumerate(memory.labels)
    ]


def store_info(
    memory: ExternalContinualLearner, config: ClassifierConfig, heads: KeptHeads
) -> dict[str, Any]:
    """Config, model, sizes, sessions and fitted heads of the store."""
    store = memory.store
    size = sum(f.stat().st_size for f in Path(store.path).iterdir() if f.is_file())
    return {
        **memory.info(),
        "format_version": store.manifest["format_version"],
        "created_by": store.manifest["created_by"],
        "embedder": store.manifest["embedder"],
        "bytes_on_disk": size,
        "config": config.model_dump(mode="json"),
        "sessions": [
            {
                "session": s.session,
                "created_at": s.created_at,
                "examples": s.n_examples,
                "new_labels": len(s.new_labels),
                "seconds": round(s.seconds, 3),
            }
            for s in memory.sessions()
        ],
        # Forgets and relabels among the sessions: their counts (no content).
        "edits": edits(store),
        "scorer_choice": (
            memory.choice.summary(memory.n_examples) if memory.choice is not None else None
        ),
        "heads": heads.summaries(),
    }


class LLMCost(BaseModel):
    """LLM work spent on one prediction, and why the ECL decided alone if it did."""

    calls: int
    prompt_tokens: int
    completion_tokens: int
    fallback: Fallback | None = Field(
        description="why the ECL decided alone although an LLM is configured (null when it did "
        "not): a reason and the detail of this case"
    )


_LEFT_OUT_WHEN_NONE = ("set", "abstained", "llm")


class PredictionRow(BaseModel):
    """One prediction as a JSON object: a line of ``icl-cl predict``, an item of
    ``/v1/predict``'s answer, the ``prediction`` record of a distributed predict. ``set``,
    ``abstained`` and ``llm`` are left out where they do not apply."""

    id: str
    labels: list[str]
    scores: dict[str, float]
    set: list[str] | None = Field(None, description="the conformal label set, when asked for")
    abstained: bool | None = Field(None, description="whether it abstained, when asked to")
    llm: LLMCost | None = Field(None, description="its LLM work, when an LLM was asked")

    @classmethod
    def of(cls, ident: str, pred: Prediction, *, abstain: bool = False) -> PredictionRow:
        """The row of ``pred``, with ``abstained`` when abstention was asked for (``abstain``)."""
        llm = None
        if pred.cost is not None:
            cost = pred.cost
            llm = LLMCost(
                calls=cost.calls,
                prompt_tokens=cost.prompt_tokens,
                completion_tokens=cost.completion_tokens,
                fallback=pred.fallback,
            )
        return cls(
            id=ident,
            labels=list(pred.labels),
            scores=pred.scores,
            set=list(pred.set) if pred.set is not None else None,
            abstained=pred.abstained if abstain else None,
            llm=llm,
        )

    def line(self) -> str:
        """The row as a line of ``icl-cl predict`` (without its newline)."""
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False)

    # Left out rather than null, as the lines have always been; ``llm.fallback`` stays null.
    # No return annotation: pydantic would take it as the schema of the row.
    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        row = handler(self)
        return {k: v for k, v in row.items() if v is not None or k not in _LEFT_OUT_WHEN_NONE}
