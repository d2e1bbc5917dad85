"""ContinualClassifier: the public entry point. Learns sessions into a store, fits the heads on
held-out stored examples, and predicts labels (reading the store only)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.backends.base import LLMBackend
from icl_cl.config import ClassifierConfig, MemoryConfig
from icl_cl.describe import label_table, store_info
from icl_cl.embedding import Embedder
from icl_cl.heads import FittedHeads, KeptHeads
from icl_cl.images import Image
from icl_cl.inputs import checks
from icl_cl.labelling.audit import AuditReport, audit_classifier
from icl_cl.labelling.edits import edit_classifier, forgetting, relabelling
from icl_cl.labelling.suggest import Suggestion, SuggestOptions, suggest_from
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.forgetting import Edit, EditReport
from icl_cl.memory.partial import ShardSums
from icl_cl.reading import LLMHandle, LLMReader, write_summaries
from icl_cl.steps import Steps, open_parts
from icl_cl.types import Example, Label, LearnReport, Prediction, Progress, Ranked, counter

logger = logging.getLogger(__name__)


class ContinualClassifier:
    """An in-context continual classifier over a persistent store.

    ``learn`` appends a session (no retraining, no forgetting) and ends with ``fit``, which fits
    the heads (fusion weights, calibration, label-set rule) on held-out stored examples and
    stores them. ``predict`` ranks candidate labels with the external continual learner, lets
    the LLM read them when fusion gave it weight, and decides; it only reads the store.

    Args:
        memory: The ECL over an open store (see :meth:`open`).
        embedder: The embedder the store was built with.
        config: The classifier config.
        backend: An LLM backend to use as it is (its owner closes it) instead of building the
            configured one; the config's ``llm`` section must still be set.
    """

    def __init__(
        self,
        memory: ExternalContinualLearner,
        embedder: Embedder,
        config: ClassifierConfig,
        *,
        backend: LLMBackend | None = None,
    ) -> None:
        self.memory = memory
        self.embedder = embedder
        self.config = config
        self.heads = KeptHeads(memory)
        self._llm = LLMHandle(Path(memory.store.path) / "llm_cache.sqlite", backend)

    @classmethod
    def open(
        cls,
        path: str | Path,
        config: ClassifierConfig | None = None,
        *,
        memory: MemoryConfig | None = None,
        embedder: Embedder | None = None,
        backend: LLMBackend | None = None,
        read_only: bool | None = None,
    ) -> ContinualClassifier:
        """Create the store at ``path`` if it does not exist, else reopen it.

        ``config`` is a new store's config; an existing store keeps its embedder (``config``
        must agree) and takes the rest of ``config`` (scorer, LLM, prompt, fusion, ...).
        ``memory`` overrides the memory settings, ``embedder`` and ``backend`` are instances to
        use instead of building the configured ones. ``read_only``: open an existing store
        without writing (``None``: when its storage cannot be written).
        """
        ecl, embedder, config = open_parts(Path(path), config, memory, embedder, read_only)
        return cls(ecl, embedder, config, backend=backend)

    def close(self) -> None:
        self._llm.close()
        self.memory.store.close()

    def __enter__(self) -> ContinualClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def learn(
        self,
        examples: Sequence[Example],
        labels: Sequence[Label] = (),
        *,
        fit: bool = True,
        k: int = 10,
        progress: Progress | None = None,
        locations: Sequence[checks.Located] | None = None,
        label_locations: Sequence[checks.Located] | None = None,
        lock_timeout: float = 0.0,
        embedded: ShardSums | None = None,
    ) -> LearnReport:
        """Learn one session (all-or-nothing: bad input changes nothing), then (``fit``)
        :meth:`fit` the heads for ``k`` candidates; once the session is stored, a failing LLM is
        only logged. Ids must be new; labels used but never defined are named by their id; a
        session of label definitions alone adds labels that retrieval finds at once.
        ``progress`` is told how far embedding and fitting got; ``locations`` and
        ``label_locations`` say where each item came from, for error messages. The writer lock
        is taken (waiting up to ``lock_timeout`` s) before the store is read or anything embedded.
        ``embedded``: the examples' vectors and each shard's sums, computed by workers.
        """
        start, examples = time.perf_counter(), list(examples)
        if fit:
            checks.check_prediction_options(k)
        with self.memory.store.writer_lock(lock_timeout):
            if self.memory.store.changed_since_load():  # another process learned: load it
                self.memory = ExternalContinualLearner.open(self.memory.store, self.memory.config)
                self.heads = KeptHeads(self.memory)
            report = self._steps().learn(
                examples, labels, start, progress, locations, label_locations, embedded
            )
        self.heads.forget()
        steps = self._steps(writing=True)
        steps.summarise(report.new_labels)
        if fit and self.memory.n_examples:
            seconds = steps.fit_after_write(self.heads, report.session, k, progress)
            report = dataclasses.replace(report, fit_seconds=seconds)
        return report

    def fit(
        self,
        k: int = 10,
        *,
        scorer: str | None = None,
        use_llm: bool = True,
        progress: Progress | None = None,
        full: bool = False,
    ) -> FittedHeads:
        """Fit the heads of predictions with ``k`` candidates, ``scorer`` and (``use_llm``) the
        configured LLM on held-out stored examples, and store them; a current fit is returned
        as it is. The only step that reads held-out items with the LLM. The ECL's choices
        (``auto``, strengths) are made again once the store has doubled since, or with
        ``full``, and then the heads too."""
        return self._steps(writing=True).fit(self.heads, k, scorer, use_llm, progress, full)

    def forget(
        self, ids: Sequence[str] = (), *, labels: Sequence[str] = (), **how: Any
    ) -> EditReport:
        """Forget stored examples by id, and ``labels`` with their examples, exactly, as one
        atomic session (see :mod:`~icl_cl.memory.forgetting`); ``how``: ``fit`` (default
        True), ``k`` and ``lock_timeout`` as :meth:`learn` takes them."""
        return self._edit(forgetting(ids, labels), **how)

    def relabel(
        self,
        new_labels: Mapping[str, Sequence[str]],
        definitions: Sequence[Label] = (),
        **how: Any,
    ) -> EditReport:
        """Give stored examples (by id) new labels, exactly, as one atomic session; a label the
        store does not know needs its definition. ``how``: as :meth:`forget` takes it."""
        return self._edit(relabelling(new_labels, definitions), **how)

    def _edit(
        self, edit: Edit, fit: bool = True, k: int = 10, lock_timeout: float = 0.0
    ) -> EditReport:
        if fit:
            checks.check_prediction_options(k)
        report = edit_classifier(self, edit, lock_timeout)
        self._llm.clear_cache()
        if fit and self.memory.n_items:
            self._steps(writing=True).fit_after_write(self.heads, report.session, k)
        return report

    def predict(
        self,
        texts: Sequence[str | Image | Any],
        k: int = 10,
        *,
        scorer: str | None = None,
        use_llm: bool = True,
        progress: Progress | None = None,
        confidence: float | None = None,
        abstain_below: float | None = None,
    ) -> list[Prediction]:
        """Predict labels for each input (a text, or an image: :class:`~icl_cl.images.Image`, a
        PIL image, bytes or a :class:`pathlib.Path`) from its top-``k`` candidates, ranked by
        ``scorer`` and, with ``use_llm``, read by the configured LLM. ``confidence`` adds a
        conformal label set holding the truth at that rate; ``abstain_below`` abstains when the
        top probability is below it. ``progress`` is told how far embedding and reading got."""
        checks.check_prediction_options(k, confidence, abstain_below)
        steps = self._steps()
        items = steps.inputs(texts)
        self.memory.require_examples()
        steps.check_reads(steps.spec(k, scorer, use_llm), items)
        queries = self.embedder.encode(items, progress=counter(progress, "embedding", len(items)))
        return self.predict_vectors(
            queries,
            k,
            scorer=scorer,
            texts=items if use_llm else None,
            progress=progress,
            confidence=confidence,
            abstain_below=abstain_below,
        )

    def predict_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        scorer: str | None = None,
        texts: Sequence[str | Image] | None = None,
        progress: Progress | None = None,
        confidence: float | None = None,
        abstain_below: float | None = None,
    ) -> list[Prediction]:
        """Predict from embedded inputs; the LLM reads ``texts`` (when given) if fusion gave it
        weight. Uses the stored heads of these settings (stale or not, said in the evidence);
        without any, fits them in memory."""
        steps, k = self._steps(), checks.check_prediction_options(k, confidence, abstain_below)
        spec = steps.spec(k, scorer, use_llm=texts is not None)
        return steps.predict(self.heads, spec, queries, texts, progress, confidence, abstain_below)

    def suggest(
        self,
        texts: Sequence[str | Image | Any],
        budget: int,
        *,
        ids: Sequence[str] | None = None,
        options: SuggestOptions | None = None,
        progress: Progress | None = None,
    ) -> list[Suggestion]:
        """The ``budget`` inputs of a pool to label next, best first, each with its reason
        (:func:`~icl_cl.labelling.suggest.suggest_from`; ``options`` holds the strategy)."""
        return suggest_from(self, texts, budget, ids, options or SuggestOptions(), progress)

    def audit(
        self,
        k: int = 10,
        *,
        scorer: str | None = None,
        limit: int | None = None,
        neighbours: int = 5,
        progress: Progress | None = None,
    ) -> AuditReport:
        """Stored examples whose labels are probably wrong, most probably wrong first (at most
        ``limit``), each with the labels it probably should have, its score and evidence
        (``neighbours`` nearest stored examples); reads the store only
        (:func:`~icl_cl.labelling.audit.audit_classifier`)."""
        return audit_classifier(
            self.memory, self.config, self.heads, k, scorer=scorer, limit=limit,
            neighbours=neighbours, progress=progress,
        )  # fmt: skip

    def candidates(
        self,
        queries: np.ndarray,
        k: int,
        *,
        texts: Sequence[str | Image] | None = None,
        scorer: str | None = None,
    ) -> Ranked:
        """The candidate stage alone: each input's top-``k`` ``(label, score)``."""
        steps = self._steps()
        return steps.candidates(steps.spec(k, scorer, texts is not None), texts, queries).ranked

    def backend(self) -> LLMBackend:
        """The configured LLM backend (created on first use, or the one given to :meth:`open`)."""
        return self._llm.get(self.config.llm)

    def reader(self) -> LLMReader:
        """The LLM reader of the configured prompt strategy."""
        return self._steps().reader()

    def write_summaries(
        self, labels: Sequence[str] | None = None, n_examples: int = 5
    ) -> dict[str, str]:
        """InCA class summaries, written by the LLM from a few stored examples of each label
        (``None``: every label with examples) and stored."""
        return write_summaries(self._steps(True).backend(), self.memory, labels, n_examples)

    def _steps(self, writing: bool = False) -> Steps:
        return Steps(self.memory, self.embedder, self.config, self._llm, writing=writing)

    def labels(self) -> list[dict[str, Any]]:
        """Known labels with their example counts and the session that introduced them."""
        return label_table(self.memory)

    def info(self) -> dict[str, Any]:
        """Config, model, sizes, sessions and fitted heads of the store."""
        return store_info(self.memory, self.config, self.heads)
