"""One prediction as a JSON object: a line of ``icl-cl predict`` and an item of ``/v1/predict``."""

from __future__ import annotations

from typing import Any

from icl_cl.types import Prediction


def prediction_row(ident: str, pred: Prediction, *, abstain: bool = False) -> dict[str, Any]:
    """``{"id", "labels", "scores"}``, with ``set`` when a conformal set was asked for,
    ``abstained`` when abstention was (``abstain``), and ``llm`` (its cost and any fallback)
    when an LLM was asked."""
    row: dict[str, Any] = {"id": ident, "labels": list(pred.labels), "scores": pred.scores}
    if pred.set is not None:
        row["set"] = list(pred.set)
    if abstain:
        row["abstained"] = pred.abstained
    if pred.cost is not None:
        row["llm"] = {
            "calls": pred.cost.calls,
            "prompt_tokens": pred.cost.prompt_tokens,
            "completion_tokens": pred.cost.completion_tokens,
            "fallback": str(pred.fallback) if pred.fallback is not None else None,
        }
    return row
