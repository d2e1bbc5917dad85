"""Classifies a micro-batch: requests with the same options in one classifier call (one
embedder call, one LLM batch), all from one snapshot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from icl_cl.config import DecisionConfig
from icl_cl.errors import IclClError
from icl_cl.images import Image
from icl_cl.service.batcher import Job
from icl_cl.service.metrics import ServiceMetrics
from icl_cl.service.serving import EmptyStoreError, Serving, Snapshot
from icl_cl.types import Prediction


@dataclass(frozen=True)
class PredictOptions:
    """The options of a predict request; requests batch together when theirs are equal."""

    k: int
    scorer: str | None = None
    confidence: float | None = None
    abstain_below: float | None = None
    decision: DecisionConfig | None = None
    use_llm: bool = True


@dataclass(frozen=True)
class Answer:
    """A request's predictions, and the session of the snapshot that made them."""

    session: int
    predictions: Sequence[Prediction]


class Predictor:
    """Runs micro-batches of predict :class:`~icl_cl.service.batcher.Job` s (items: texts or
    images; options: :class:`PredictOptions`) and sets each job's future to an :class:`Answer`."""

    def __init__(self, serving: Serving, metrics: ServiceMetrics) -> None:
        self.serving = serving
        self.metrics = metrics

    def run(self, jobs: list[Job]) -> None:
        self.metrics.batch_items.observe(sum(len(job.items) for job in jobs))
        with self.serving.reading() as snapshot:
            if snapshot.clf.memory.n_examples == 0:
                for job in jobs:
                    job.future.set_exception(
                        EmptyStoreError("the store is empty: learn a session first")
                    )
                return
            groups: dict[PredictOptions, list[Job]] = {}
            for job in jobs:
                groups.setdefault(job.options, []).append(job)  # type: ignore[arg-type]
            for options, group in groups.items():
                self._predict(snapshot, options, group)

    def _predict(self, snapshot: Snapshot, options: PredictOptions, group: list[Job]) -> None:
        items: list[str | Image] = [item for job in group for item in job.items]
        try:
            predictions = snapshot.view(options.decision).predict(
                items,
                options.k,
                scorer=options.scorer,
                use_llm=options.use_llm,
                confidence=options.confidence,
                abstain_below=options.abstain_below,
            )
        except IclClError as exc:
            if len(group) == 1:
                group[0].future.set_exception(exc)
                return
            for job in group:  # one request's input failed the batch: find it, serve the rest
                self._predict(snapshot, options, [job])
            return
        self.metrics.predicted(predictions)
        start = 0
        for job in group:
            end = start + len(job.items)
            job.future.set_result(Answer(snapshot.session, predictions[start:end]))
            start = end
