"""The steps of a learn, a prediction and a fit, wired for one classifier: the store opened with
its config and embedder, the session's checks and embedding, the candidate source, the LLM's
reading and the held-out items the heads are fitted on.

Held-out items go through the same candidate and reading steps as predictions, so the heads are
fitted on the scores they will be applied to.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from icl_cl.backends.base import LLMBackend
from icl_cl.candidates import Candidates, candidate_source
from icl_cl.config import ClassifierConfig, MemoryConfig
from icl_cl.embedding import Embedder, centred_for_store, load_embedder
from icl_cl.errors import BackendError, ConfigError, DataError, StoreError
from icl_cl.heads import FittedHeads, HeadSpec, KeptHeads, StoreHeldOutSource
from icl_cl.heads.scorer_choice_fit import refresh_scorer_choice
from icl_cl.images import Image
from icl_cl.inputs import checks
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.partial import ShardSums, merge
from icl_cl.memory.store import MANIFEST, Store
from icl_cl.reading import LLMHandle, LLMReader, Reading, write_summaries
from icl_cl.types import (
    EclRanker,
    Example,
    Fallback,
    Label,
    LearnReport,
    Prediction,
    Progress,
    Upstream,
    counter,
)

logger = logging.getLogger(__name__)


def open_parts(
    path: Path,
    config: ClassifierConfig | None,
    memory: MemoryConfig | None,
    embedder: Embedder | None,
    read_only: bool | None,
) -> tuple[ExternalContinualLearner, Embedder, ClassifierConfig]:
    """The ECL, embedder and config of the store at ``path``, created if it does not exist (see
    :meth:`~icl_cl.classifier.ContinualClassifier.open`)."""
    store, config, embedder = _open_store(path, config, embedder, read_only)
    if memory is not None:
        config = config.model_copy(update={"memory": memory})
    embedder = centred_for_store(embedder, config.embedder, store)
    return ExternalContinualLearner.open(store, config.memory), embedder, config


def _open_store(
    path: Path,
    config: ClassifierConfig | None,
    embedder: Embedder | None,
    read_only: bool | None,
) -> tuple[Store, ClassifierConfig, Embedder]:
    """An existing store keeps its embedder (``config``'s must agree) and takes the query
    settings of ``config``; a new one is created with ``config`` (or the default config)."""
    if (path / MANIFEST).exists():
        store = Store.open(path, read_only=read_only)
        stored = ClassifierConfig.from_dict(store.meta("config"), source=str(path))
        try:
            embedder = embedder or load_embedder((config or stored).embedder)
        except BaseException:
            store.close()
            raise
        # The name says model, backend and quantisation: vectors of two never mix in a store.
        if embedder.name != store.manifest["embedder"]:
            store.close()
            raise ConfigError(
                f"{path}: store was built with embedder {store.manifest['embedder']!r}, "
                f"not {embedder.name!r}"
            )
        config = stored.with_query_settings(config) if config is not None else stored
        return store, config, embedder
    if read_only:
        raise StoreError(f"{path}: no store here to open read-only")
    config = config or ClassifierConfig()
    embedder = embedder or load_embedder(config.embedder)
    dump = config.model_dump(mode="json")
    store = Store.create(path, dim=embedder.dim, embedder=embedder.name, config=dump)
    return store, config, embedder


class Steps:
    """A classifier's steps under one config.

    Args:
        memory: The ECL.
        embedder: The store's embedder.
        config: The classifier config.
        llm: The classifier's LLM.
        writing: Whether the work is stored (a fit): the LLM is then used behind the store's
            call cache.
    """

    def __init__(
        self,
        memory: ExternalContinualLearner,
        embedder: Embedder,
        config: ClassifierConfig,
        llm: LLMHandle,
        *,
        writing: bool = False,
    ) -> None:
        self.memory = memory
        self.embedder = embedder
        self.config = config
        self.llm = llm
        self.writing = writing

    def learn(
        self,
        examples: list[Example],
        labels: Sequence[Label],
        start: float,
        progress: Progress | None = None,
        locations: Sequence[checks.Located] | None = None,
        label_locations: Sequence[checks.Located] | None = None,
        embedded: ShardSums | None = None,
    ) -> LearnReport:
        """Check one session against the store, embed it and commit it (under the writer lock:
        nothing can change the store between the checks and the commit). ``embedded``: the
        vectors and each shard's sums from workers, merged here against the store's."""
        new, multi = checks.check_learn(
            examples,
            labels,
            max_chars=self.config.max_text_chars,
            existing_ids=self.memory.store.existing_ids,
            known=self.memory.label,
            multi_label=self.config.multi_label,
            stored_multi_label=self.memory.multi_label,
            reads_images=self.embedder.reads_images,
            embedder=self.embedder.name,
            locations=locations,
            label_locations=label_locations,
        )
        embed_start = time.perf_counter()
        items = [ex.item for ex in examples]
        delta, space_sums = None, None
        if embedded is None:
            vectors = self.embedder.encode(
                items, progress=counter(progress, "embedding", len(items))
            )
        else:
            vectors, delta = embedded.vectors, merge(embedded.statistics, self.memory.stats)
            space_sums = embedded.spaces
        label_vectors = self.embedder.encode([lab.text for lab in new])
        embed_end = time.perf_counter()
        session = self.memory.learn(
            examples,
            vectors,
            new,
            label_vectors,
            multi_label=multi,
            seconds=embed_end - start,
            delta=delta,
            space_sums=space_sums,
        )
        names = tuple(lab.label for lab in new)
        logger.info("learned session %d: %d examples, %d new labels", session, len(items), len(new))
        return LearnReport(
            session, len(examples), names, time.perf_counter() - start, embed_end - embed_start
        )

    def fit(
        self,
        heads: KeptHeads,
        k: int,
        scorer: str | None,
        use_llm: bool,
        progress: Progress | None = None,
        full: bool = False,
    ) -> FittedHeads:
        """:meth:`~icl_cl.classifier.ContinualClassifier.fit` (on writing steps): the ECL's
        choices made again when due, then the heads of this spec fitted and stored in ``heads``
        unless a current fit is kept."""
        self.memory.require_examples()
        self.memory.store.require_writable()  # before the work, not at its end
        self.refresh_scorer_choice(scorer, progress, full=full)
        self.memory.refresh_strengths(scorer, full=full)
        spec = self.spec(checks.check_prediction_options(k), scorer, use_llm)
        fitted = heads.fit_and_save(spec, lambda: self.heldout(spec, progress), full=full)
        self.memory.save_derived()
        return fitted

    def fit_after_write(
        self, heads: KeptHeads, session: int, k: int, progress: Progress | None = None
    ) -> float:
        """:meth:`fit` after a learn or an edit, in seconds; ``session`` is stored, so a failing
        fit is only logged."""
        start = time.perf_counter()
        try:
            self.fit(heads, k, None, True, progress)
        except (BackendError, DataError) as exc:  # e.g. images for a text-only LLM
            logger.warning("session %d is stored, but fitting failed: %s", session, exc)
        return time.perf_counter() - start

    def summarise(self, labels: Sequence[str]) -> None:
        """InCA class summaries of new ``labels`` (on writing steps) when the prompt presents
        labels by their summaries; the session is stored, so a failing LLM is only logged."""
        if self.config.llm is not None and self.config.prompt.label_presentation == "summaries":
            try:
                write_summaries(self.backend(), self.memory, list(labels), n_examples=5)
            except BackendError as exc:
                logger.warning("could not write class summaries now: %s", exc)

    def inputs(self, values: Sequence[object]) -> list[str | Image]:
        """Prediction inputs checked: texts within the config's length, images loaded and
        refused when the embedder reads text only."""
        return checks.prediction_inputs(
            values,
            max_chars=self.config.max_text_chars,
            reads_images=self.embedder.reads_images,
            embedder=self.embedder.name,
        )

    def predict(
        self,
        heads: KeptHeads,
        spec: HeadSpec,
        queries: np.ndarray,
        texts: Sequence[str | Image] | None,
        progress: Progress | None,
        confidence: float | None,
        abstain_below: float | None,
    ) -> list[Prediction]:
        """Predictions of embedded inputs by the kept heads of ``spec`` (stale or not, said in
        the evidence; without any, fitted in memory); the LLM reads ``texts`` (when given) if
        fusion gave it weight."""
        found = self.candidates(spec, texts, queries)
        fitted, fallback = heads.for_prediction(spec, lambda: self.heldout(spec, progress))
        readings = None
        if texts is not None and fitted.fusion is not None and fitted.fusion.uses_added:
            readings = self.read(texts, queries, found, progress)
        multi = bool(self.memory.multi_label)
        return fitted.decide(
            found.ranked,
            [r.scores for r in readings] if readings is not None else None,
            cardinality=self.memory.expected_cardinality(queries) if multi else None,
            upstream=self.upstream(spec, found, readings, fallback or fitted.llm_fallback()),
            confidence=confidence,
            abstain_below=abstain_below,
            stale=not heads.current(fitted),
        )

    def backend(self) -> LLMBackend:
        """The LLM backend (created on first use)."""
        if self.writing:
            return self.llm.for_writing(self.config.llm)
        return self.llm.get(self.config.llm)

    def spec(self, k: int, scorer: str | None, use_llm: bool) -> HeadSpec:
        """The spec of predictions with ``k`` candidates, ``scorer`` and (``use_llm``) the LLM."""
        return HeadSpec.of(self.config, k, self.memory.resolve_scorer(scorer), use_llm=use_llm)

    def refresh_scorer_choice(
        self, scorer: str | None, progress: Progress | None, *, full: bool = False
    ) -> None:
        """Choose anew on held-out stored examples what ``auto`` stands for (and ranpac's
        strength) when ``scorer`` depends on it and the store has outgrown the last choice, or
        with ``full`` (a fit step)."""
        memory = self.config.memory
        requested = scorer or memory.scorer
        refresh_scorer_choice(
            self.memory, requested, memory.auto_heldout, self.config.fusion.seed, progress,
            full=full,
        )  # fmt: skip

    def reader(self) -> LLMReader:
        """The LLM reader of the configured prompt strategy."""
        return LLMReader(self.backend(), self.memory, self.config.prompt, self.config.calibration)

    def check_reads(self, spec: HeadSpec, items: Sequence[str | Image]) -> None:
        """Refuse, before any work, inputs the LLM steps of ``spec`` cannot take (images)."""
        llm = self.config.llm
        if spec.reads and llm is not None:
            checks.check_reader_reads(
                items,
                infers=spec.infers,
                reads_images=lambda: self.backend().capabilities.images,
                llm=f"{llm.backend} ({llm.model})",
            )

    def read(
        self,
        texts: Sequence[str | Image],
        queries: np.ndarray,
        found: Candidates,
        progress: Progress | None = None,
    ) -> list[Reading]:
        """The LLM's reading of each input's candidates."""
        labels = [[label for label, _ in c] for c in found.ranked]
        done = counter(progress, "reading candidates (LLM)", len(labels))
        return self.reader().read(texts, queries, labels, progress=done).readings

    def candidates(
        self,
        spec: HeadSpec,
        texts: Sequence[str | Image] | None,
        queries: np.ndarray,
        rank: EclRanker | None = None,
        exclude: Sequence[frozenset[str]] | None = None,
    ) -> Candidates:
        """Each input's candidates. Infer-Retrieve-Rank's infer step reads ``texts`` (when given);
        ``rank`` stands for the ECL (held-out fits leave their items out of it)."""
        infer = spec.infers and texts is not None
        if rank is None:
            rank = lambda vectors, k: self.memory.candidates(vectors, k, spec.scorer)  # noqa: E731
        llm = self.backend() if infer else None
        source = candidate_source(self.memory, self.embedder, self.config.irr, rank, llm)
        return source.candidates(texts if infer else None, queries, spec.k, exclude)

    def heldout(self, spec: HeadSpec, progress: Progress | None = None) -> StoreHeldOutSource:
        """The held-out items of ``spec``, through these candidate and reading steps."""
        reader = self.reader() if spec.reads else None
        return StoreHeldOutSource(
            self.memory,
            scorer=spec.scorer,
            seed=spec.fusion.seed,
            candidates=lambda items, vectors, rank, exclude: (
                self.candidates(spec, items, vectors, rank, exclude).ranked
            ),
            read=reader.scores if reader is not None else None,
            progress=progress,
        )

    @staticmethod
    def upstream(
        spec: HeadSpec,
        found: Candidates,
        readings: list[Reading] | None,
        fallback: Fallback | None,
    ) -> list[Upstream] | None:
        """Per input: cost, fallback and evidence of the LLM steps before the heads (``None``
        when no LLM step ran or was asked for)."""
        if not spec.reads and found.inferred is None:
            return None
        out = []
        for i in range(len(found.ranked)):
            before = found.inferred.upstream(i) if found.inferred is not None else Upstream()
            if readings is not None:
                before = readings[i].after(before)
            elif spec.reads:
                before = dataclasses.replace(before, fallback=fallback)
            out.append(before)
        return out
