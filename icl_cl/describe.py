"""What ``icl-cl info`` and ``icl-cl labels`` show about a classifier's store, and one prediction
as a JSON object (a line of ``icl-cl predict``, an item of ``/v1/predict``, a record of a
distributed predict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from icl_cl.config import ClassifierConfig
from icl_cl.heads import KeptHeads
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.forgetting import edits
from icl_cl.types import Prediction


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
