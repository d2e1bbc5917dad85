"""ContinualClassifier: the public entry point. Learns sessions into a store; predicts labels."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.backends.base import GenerationParams, LLMBackend
from icl_cl.calibration.calibrator import ScoreCalibrator
from icl_cl.config import ClassifierConfig, MemoryConfig
from icl_cl.data import Located, check_text, location_of, validate_examples
from icl_cl.embedding import Embedder, load_embedder
from icl_cl.embedding.base import ProgressCallback
from icl_cl.errors import BackendError, ConfigError, DataError
from icl_cl.images import Image, load_image
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.store import MANIFEST, Store
from icl_cl.pipelines.decision import LabelSetRule
from icl_cl.pipelines.fusion import FusionWeights, fit_fusion
from icl_cl.pipelines.infer_retrieve_rank import Inferred, InferRetrieveRank
from icl_cl.pipelines.reader import LLMReader, Reading
from icl_cl.prompting import load_template, render_instruction
from icl_cl.types import Candidate, Example, Label, Prediction

logger = logging.getLogger(__name__)

# Held-out stored examples are scored in folds of at most this many (see _heldout).
_HELDOUT_FOLD = 200
# Part of every fitted-parameter key: bump it when what is fitted changes form.
_FITTED_VERSION = 6

# Held-out items' candidate labels and gold labels.
_Labelled = tuple[list[list[str]], list[set[str]]]
# Held-out items' ECL scores, LLM scores, gold candidate columns and labels.
_Readings = tuple[list[np.ndarray], list[np.ndarray], list[list[int]], _Labelled]
# Held-out items' decision scores, gold candidate columns and labels.
_Decisions = tuple[list[np.ndarray], list[list[int]], _Labelled]


@dataclass(frozen=True)
class LearnReport:
    """What one call to :meth:`ContinualClassifier.learn` stored."""

    session: int
    n_examples: int
    new_labels: tuple[str, ...]
    seconds: float
    embed_seconds: float


class ContinualClassifier:
    """An in-context continual classifier over a persistent store.

    Use :meth:`open` to create or reopen a store. ``learn`` appends a session (no retraining, no
    forgetting); ``predict`` ranks candidate labels with the external continual learner and decides.
    """

    def __init__(
        self, memory: ExternalContinualLearner, embedder: Embedder, config: ClassifierConfig
    ) -> None:
        self.memory = memory
        self.embedder = embedder
        self.config = config
        self._backend: LLMBackend | None = None
        self._owns_backend = True
        # Held-out readings of the last refit: the fusion and the calibration fit on the same ones.
        self._readings: tuple[str, _Readings] | None = None
        # The ECL's held-out items of the last fit, shared by the calibration and the label sets.
        self._ecl_heldout: tuple[str, _Decisions] | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        config: ClassifierConfig | None = None,
        *,
        memory: MemoryConfig | None = None,
        embedder: Embedder | None = None,
        backend: LLMBackend | None = None,
    ) -> ContinualClassifier:
        """Create the store at ``path`` if it does not exist, else reopen it.

        Args:
            path: Store directory.
            config: Config for a new store. For an existing store it must agree with the stored
                one on the embedder; its other settings (scorer, LLM, prompt, fusion) apply to
                this session.
            memory: Query-time memory settings that override the stored ones (scorer, k of kNN).
            embedder: An embedder instance to use instead of loading the configured one.
            backend: An LLM backend instance to use instead of building the configured one
                (the config's ``llm`` section must still be set for the LLM stage to run).
        """
        path = Path(path)
        if (path / MANIFEST).exists():
            store = Store.open(path)
            stored = ClassifierConfig.from_dict(store.meta("config"), source=str(path))
            # The name says model, backend and quantisation: vectors of two never mix in a store.
            built_with = store.manifest["embedder"]
            try:
                wanted = (embedder or load_embedder((config or stored).embedder)).name
            except BaseException:
                store.close()
                raise
            if wanted != built_with:
                store.close()
                raise ConfigError(
                    f"{path}: store was built with embedder {built_with!r}, not {wanted!r}"
                )
            if config is not None:
                # Everything but the embedder and the label mode is a query-time setting.
                stored = stored.model_copy(
                    update={
                        field: getattr(config, field)
                        for field in (
                            "memory",
                            "llm",
                            "prompt",
                            "fusion",
                            "calibration",
                            "decision",
                            "irr",
                            "max_text_chars",
                        )
                    }
                )
            config = stored
        else:
            config = config or ClassifierConfig()
            embedder = embedder or load_embedder(config.embedder)
            store = Store.create(
                path,
                dim=embedder.dim,
                embedder=embedder.name,
                config=config.model_dump(mode="json"),
            )
        if memory is not None:
            config = config.model_copy(update={"memory": memory})
        embedder = embedder or load_embedder(config.embedder)
        clf = cls(ExternalContinualLearner(store, config.memory), embedder, config)
        clf._backend = backend
        clf._owns_backend = backend is None  # a backend the caller passed in stays open
        return clf

    def close(self) -> None:
        if self._backend is not None and self._owns_backend:
            self._backend.close()
        self._backend = None
        self.memory.store.close()

    def __enter__(self) -> ContinualClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- learning --------------------------------------------------------------------------

    def learn(
        self,
        examples: Sequence[Example],
        labels: Sequence[Label] = (),
        *,
        progress: ProgressCallback | None = None,
        locations: Sequence[Located] | None = None,
        label_locations: Sequence[Located] | None = None,
    ) -> LearnReport:
        """Learn one session. All-or-nothing: on any error, the store is unchanged.

        Args:
            examples: The session's examples. Ids must be new to the store. May be empty when
                ``labels`` defines new labels (labels known by name alone, which label retrieval
                finds at once; the ECL scores them once they have examples).
            labels: Label definitions (names, descriptions). Labels used by examples but not
                defined here or earlier are created with their identifier as name.
            progress: Called with the number of texts embedded so far, chunk by chunk.
            locations: Where each example came from, for error messages.
            label_locations: Where each label came from, for error messages.
        """
        start = time.perf_counter()
        examples = list(examples)
        if not examples and not labels:
            raise DataError("a session needs at least one example or one label definition")
        validate_examples(examples, max_chars=self.config.max_text_chars, locations=locations)
        self._check_new_ids(examples, locations)
        new_labels = self._new_labels(examples, labels, label_locations)
        if not examples and not new_labels:
            raise DataError("nothing to learn: no examples, and every label given is already known")
        multi_label = self._multi_label_after(examples, locations)

        embed_start = time.perf_counter()
        self._check_images([ex.item for ex in examples], [ex.id for ex in examples], locations)
        vectors = self.embedder.encode([ex.item for ex in examples], progress=progress)
        label_vectors = self.embedder.encode([lab.text for lab in new_labels])
        embed_seconds = time.perf_counter() - embed_start
        session = self.memory.learn(
            examples,
            vectors,
            new_labels,
            label_vectors,
            multi_label=multi_label,
            seconds=time.perf_counter() - start,
        )
        report = LearnReport(
            session=session,
            n_examples=len(examples),
            new_labels=tuple(lab.label for lab in new_labels),
            seconds=time.perf_counter() - start,
            embed_seconds=embed_seconds,
        )
        if self.config.llm is not None and self.config.prompt.label_presentation == "summaries":
            try:
                self.write_summaries(list(report.new_labels))
            except BackendError as exc:  # the session is stored; summaries can be written later
                logger.warning(
                    "could not write class summaries now (icl-cl summarize retries): %s", exc
                )
        logger.info(
            "learned session %d: %d examples, %d new labels",
            session,
            len(examples),
            len(new_labels),
        )
        return report

    def _check_new_ids(
        self, examples: Sequence[Example], locations: Sequence[Located] | None
    ) -> None:
        clash = set(self.memory.store.existing_ids([ex.id for ex in examples]))
        if clash:
            i = next(i for i, ex in enumerate(examples) if ex.id in clash)
            at = location_of(locations, i)
            raise DataError(
                f"id already in the store ({len(clash)} such ids in this session)",
                field="id",
                item=examples[i].id,
                **at,
            )

    def _new_labels(
        self,
        examples: Sequence[Example],
        labels: Sequence[Label],
        locations: Sequence[Located] | None,
    ) -> list[Label]:
        declared: dict[str, Label] = {}
        for i, lab in enumerate(labels):
            at = location_of(locations, i)
            if not isinstance(lab, Label) or not lab.label.strip():
                raise DataError("expected a Label with a non-empty identifier", item=str(i), **at)
            if lab.label in declared:
                raise DataError("label defined twice", field="label", item=lab.label, **at)
            known = self.memory.label(lab.label)
            if known is not None:
                for field in ("name", "description", "group"):
                    if getattr(known, field) != getattr(lab, field):
                        raise DataError(
                            f"conflicts with the stored label ({field} {getattr(known, field)!r} "
                            f"vs {getattr(lab, field)!r})",
                            field=field,
                            item=lab.label,
                            **at,
                        )
            declared[lab.label] = lab
        new = [lab for lab in declared.values() if self.memory.label(lab.label) is None]
        known_or_new = {lab.label for lab in new}
        for ex in examples:
            for name in ex.labels:
                if name not in known_or_new and self.memory.label(name) is None:
                    known_or_new.add(name)
                    new.append(Label(name))
        return new

    def _multi_label_after(
        self, examples: Sequence[Example], locations: Sequence[Located] | None
    ) -> bool:
        """Whether the store is multi-label once this session is in."""
        setting = self.config.multi_label
        if setting is False:
            for i, ex in enumerate(examples):
                if len(ex.labels) != 1:
                    at = location_of(locations, i)
                    raise DataError(
                        f"a single-label store needs exactly one label, got {len(ex.labels)}",
                        field="labels",
                        item=ex.id,
                        **at,
                    )
            return False
        if setting is True:
            return True
        seen_multi = any(len(ex.labels) != 1 for ex in examples)
        if seen_multi and self.memory.multi_label is False:
            logger.warning("examples with != 1 label: the store becomes multi-label")
        return bool(self.memory.multi_label) or seen_multi

    # ---- prediction ------------------------------------------------------------------------

    def predict(
        self,
        texts: Sequence[str | Image | Any],
        k: int = 10,
        *,
        scorer: str | None = None,
        use_llm: bool = True,
        progress: ProgressCallback | None = None,
        confidence: float | None = None,
        abstain_below: float | None = None,
    ) -> list[Prediction]:
        """Predict labels for each text.

        Args:
            texts: Inputs to classify: texts, or images (:class:`~icl_cl.images.Image`, PIL
                images, bytes, or :class:`pathlib.Path` paths).
            k: Number of candidate labels to return (and, with an LLM, to read in context).
            scorer: ECL scorer to rank candidates with; default from the config.
            use_llm: Let the configured LLM read the candidates (no effect without an LLM).
            progress: Called with the number of texts embedded so far.
            confidence: Also give each prediction a conformal label set that holds the truth
                at this rate (e.g. 0.9), calibrated on held-out stored examples.
            abstain_below: Abstain (no label) when the top probability is below this.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise DataError(f"k must be a positive integer, got {k!r}")
        items = [self._input(text, i) for i, text in enumerate(texts)]
        self.memory.require_examples()
        self._check_images(items, [str(i) for i in range(len(items))], None)
        if use_llm and self.config.llm is not None and self._reads():
            self._check_reader_images(items)
        queries = self.embedder.encode(items, progress=progress)
        return self.predict_vectors(
            queries,
            k,
            scorer=scorer,
            texts=items if use_llm else None,
            confidence=confidence,
            abstain_below=abstain_below,
        )

    def _input(self, value: object, i: int) -> str | Image:
        """A prediction input checked: a text, or an image loaded from what was given."""
        if isinstance(value, str):
            return check_text(value, max_chars=self.config.max_text_chars, item=str(i))
        return load_image(value, item=str(i))

    def _check_images(
        self,
        items: Sequence[str | Image],
        ids: Sequence[str],
        locations: Sequence[Located] | None,
    ) -> None:
        """Refuse images, naming the first, when the embedder reads text only."""
        if getattr(self.embedder, "reads_images", False):
            return
        for i, item in enumerate(items):
            if isinstance(item, Image):
                raise DataError(
                    f"the embedder {self.embedder.name} reads text only; configure a CLIP-style "
                    "embedder (embedder.model, e.g. clip-ViT-B-32) to learn or classify images",
                    field="image",
                    item=ids[i],
                    **location_of(locations, i),
                )

    def _check_reader_images(self, items: Sequence[str | Image]) -> None:
        """Refuse images, naming the first, when the LLM cannot read them (before any work)."""
        first = next((i for i, item in enumerate(items) if isinstance(item, Image)), None)
        if first is None:
            return
        if self._infers():
            raise DataError(
                "Infer-Retrieve-Rank's infer step writes queries from text; image inputs need "
                "irr.infer off",
                field="image",
                item=str(first),
            )
        if not self.backend().capabilities.images:
            raise DataError(
                f"the LLM backend {self.config.llm.backend} ({self.config.llm.model}) reads text "
                "only; use a vision-language model, or predict with use_llm=False",
                field="image",
                item=str(first),
            )

    def candidates(
        self,
        queries: np.ndarray,
        k: int,
        *,
        texts: Sequence[str | Image] | None = None,
        scorer: str | None = None,
    ) -> list[list[tuple[str, float]]]:
        """The candidate stage alone: each input's top-``k`` ``(label, score)`` from the ECL, or
        from Infer-Retrieve-Rank's infer (given ``texts``) and retrieve steps when configured."""
        scorer_name = self.memory.resolve_scorer(scorer)
        ranked, _ = self._candidates(
            texts, queries, k, lambda v: self.memory.candidates(v, k, scorer_name)
        )
        return ranked

    def predict_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        *,
        scorer: str | None = None,
        texts: Sequence[str | Image] | None = None,
        confidence: float | None = None,
        abstain_below: float | None = None,
    ) -> list[Prediction]:
        """Predict from already-embedded inputs. With ``texts`` and a configured LLM, the LLM
        reads each input's candidates and its scores are fused with the ECL's. Scores become
        probabilities by the calibration fitted on held-out stored examples."""
        if k <= 0:
            raise DataError(f"k must be a positive integer, got {k!r}")
        if confidence is not None and not 0 < confidence < 1:
            raise DataError(f"confidence must be in (0, 1), got {confidence!r}")
        if abstain_below is not None and not 0 <= abstain_below <= 1:
            raise DataError(f"abstain_below must be in [0, 1], got {abstain_below!r}")
        scorer_name = self.memory.resolve_scorer(scorer)
        ranked, inferred = self._candidates(
            texts, queries, k, lambda v: self.memory.candidates(v, k, scorer_name)
        )
        multi = bool(self.memory.multi_label)
        cardinality = self.memory.expected_cardinality(queries) if multi else np.ones(len(queries))
        weights: FusionWeights | None = None
        readings: list[Reading] | None = None
        skipped: str | None = None
        if texts is not None and self.config.llm is not None and self._reads():
            try:
                weights = self.fusion_weights(k, scorer_name)
            except BackendError as exc:
                # Weights cannot be fitted while the LLM is down: the ECL decides, and says why.
                weights = FusionWeights(1.0, 0.0, 0, float("nan"), float("nan"), float("nan"))
                skipped = f"backend error: {exc}"
            if weights.uses_llm:
                cand_labels = [[label for label, _ in c] for c in ranked]
                readings = self.reader().read(texts, queries, cand_labels).readings
            elif skipped is None:
                skipped = (
                    f"LLM weight 0: on {weights.heldout_items} held-out stored examples the ECL alone "
                    f"({weights.heldout_ecl:.3f}) was at least as good as fused ({weights.heldout_fused:.3f})"
                )
        calibrator = self.calibrator(k, scorer_name, weights)
        rule = self.label_set_rule(k, scorer_name, weights, calibrator) if multi else None
        predictions = []
        for i, (cands, card) in enumerate(zip(ranked, cardinality, strict=True)):
            labels = [label for label, _ in cands]
            ecl = np.array([score for _, score in cands], dtype=np.float64)
            reading = readings[i] if readings is not None else None
            llm = reading.scores if reading is not None else None
            fused = weights.combine(ecl, llm) if weights is not None else ecl
            prob = calibrator.probabilities(fused[None, :])[0]
            order = np.lexsort((-fused, -prob))  # probability first; raw score breaks ties
            top = rule.choose([labels[j] for j in order], prob[order], card) if rule else (0,)
            chosen = tuple(labels[order[j]] for j in top)
            abstained = abstain_below is not None and float(prob[order[0]]) < abstain_below
            conformal = None
            if confidence is not None:
                conformal = tuple(labels[j] for j in calibrator.sets(prob[None, :], confidence)[0])
            evidence: dict[str, Any] = {"expected_cardinality": float(card)} if multi else {}
            if rule is not None:
                evidence["decision"] = rule.evidence(chosen)
            if not multi:
                evidence["p_outside_candidates"] = max(0.0, 1.0 - float(prob.sum()))
            llm_info = None
            if weights is not None or inferred is not None:
                llm_info = {
                    "calls": 0,
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "fallback": skipped,
                }
            if inferred is not None:
                assert llm_info is not None
                evidence["irr"] = {
                    "queries": inferred.queries[i],
                    "infer_tokens": inferred.prompt_tokens[i],
                }
                llm_info["calls"] += inferred.calls[i]
                llm_info["prompt_tokens"] += inferred.prompt_tokens[i]
                llm_info["completion_tokens"] += inferred.completion_tokens[i]
            if weights is not None:
                assert llm_info is not None
                evidence["fusion"] = weights.to_dict()
                if reading is not None:
                    llm_info["fallback"] = reading.fallback
                    if reading.prompt is not None:
                        llm_info["calls"] += reading.calls
                        llm_info["prompt_tokens"] += (
                            reading.prompt.tokens + reading.calibration_tokens
                        )
                        evidence["demonstrations"] = reading.prompt.demonstrations
                        evidence["llm_seconds"] = reading.seconds
                        if reading.prompt.shortened:
                            evidence["shortened"] = reading.prompt.shortened
            predictions.append(
                Prediction(
                    labels=() if abstained else chosen,
                    scores={labels[j]: float(prob[j]) for j in order},
                    candidates=tuple(
                        Candidate(
                            labels[j],
                            float(fused[j]),
                            ecl_score=float(ecl[j]),
                            llm_score=None if llm is None else float(llm[j]),
                            probability=float(prob[j]),
                        )
                        for j in order
                    ),
                    scorer=scorer_name,
                    fallback=llm_info["fallback"] if llm_info else None,
                    llm=llm_info,
                    evidence=evidence,
                    set=conformal,
                    abstained=abstained,
                )
            )
        return predictions

    # ---- the LLM stage ---------------------------------------------------------------------

    def backend(self) -> LLMBackend:
        """The configured LLM backend (created on first use, behind the store's call cache)."""
        if self.config.llm is None:
            raise ConfigError("no LLM is configured (set 'llm' in the classifier config)")
        if self._backend is None:
            from icl_cl.backends.cache import CachedBackend
            from icl_cl.backends.registry import create_backend

            llm = self.config.llm
            backend = create_backend(llm.backend, model=llm.model, **llm.options)
            if llm.cache:
                backend = CachedBackend(backend, Path(self.memory.store.path) / "llm_cache.sqlite")
            self._backend = backend
        return self._backend

    def reader(self) -> LLMReader:
        return LLMReader(self.backend(), self.memory, self.config.prompt, self.config.calibration)

    def _fitted_key(self, kind: str, k: int, scorer: str, *extra: object) -> str:
        """Key of fitted parameters: everything that changes the held-out scores they come from."""
        llm = self.config.llm.model_dump(mode="json") if self.config.llm else None
        calibration = self.config.calibration
        reading = [
            calibration.in_context,
            list(calibration.content_free),
            calibration.domain_samples,
        ]
        spec = json.dumps(
            [
                _FITTED_VERSION,
                llm,
                self.config.prompt.model_dump(mode="json"),
                self.config.fusion.model_dump(mode="json"),
                self.config.irr.model_dump(mode="json") if self.config.irr else None,
                reading,
                k,
                scorer,
                *list(extra),
            ],
            sort_keys=True,
        )
        return f"{kind}:" + hashlib.sha256(spec.encode()).hexdigest()[:16]

    def fusion_weights(self, k: int, scorer: str | None = None) -> FusionWeights:
        """Fusion weights for this LLM, prompt strategy, ``k`` and scorer; refitted when the store
        has grown since the last fit. Fitting holds out stored examples (their statistics are
        subtracted exactly) and asks the LLM about them."""
        scorer = self.memory.resolve_scorer(scorer)
        key = self._fitted_key("fusion", k, scorer)
        stored = self._fresh_fitted(key)
        if stored is not None:
            return FusionWeights(**stored)
        ecl, llm, gold, _ = self._heldout_readings(k, scorer, self.config.fusion.heldout)
        weights = fit_fusion(ecl, llm, [{j for j in g if j >= 0} for g in gold])
        self.memory.store.save_fitted(key, weights.to_dict(), self.memory.n_examples)
        logger.info("fusion weights: %s", weights)
        return weights

    def calibrator(
        self, k: int, scorer: str | None = None, weights: FusionWeights | None = None
    ) -> ScoreCalibrator:
        """Scores-to-probabilities calibration and conformal scores for decisions made with
        these fusion ``weights`` (``None``: the ECL alone), refitted when the store has grown.

        Fitted on the held-out items of :meth:`_heldout_decisions`.
        """
        scorer = self.memory.resolve_scorer(scorer)
        key = self._heldout_fit_key("calibration", k, scorer, weights)
        stored = self._fresh_fitted(key)
        if stored is not None:
            return ScoreCalibrator.from_dict(stored)
        scores, gold, _ = self._heldout_decisions(k, scorer, weights)
        calibrator = ScoreCalibrator.fit(
            scores, gold, bool(self.memory.multi_label), self.config.calibration.probability
        )
        self.memory.store.save_fitted(key, calibrator.to_dict(), self.memory.n_examples)
        return calibrator

    def label_set_rule(
        self,
        k: int,
        scorer: str | None = None,
        weights: FusionWeights | None = None,
        calibrator: ScoreCalibrator | None = None,
    ) -> LabelSetRule:
        """The configured rule choosing a multi-label prediction's labels (``config.decision``).

        ``label_thresholds`` are fitted on the calibration's held-out items, through the
        probabilities of ``calibrator`` (default: :meth:`calibrator` with these arguments),
        stored, and refitted when the store has grown.
        """
        decision = self.config.decision
        if decision.rule != "label_thresholds":
            return LabelSetRule(decision.rule, decision.threshold)
        scorer = self.memory.resolve_scorer(scorer)
        key = self._heldout_fit_key("decision", k, scorer, weights, decision.threshold)
        stored = self._fresh_fitted(key)
        if stored is not None:
            return LabelSetRule.from_dict(stored)
        if calibrator is None:
            calibrator = self.calibrator(k, scorer, weights)
        scores, _, (labels, gold) = self._heldout_decisions(k, scorer, weights)
        probabilities = [calibrator.probabilities(s[None, :])[0] for s in scores]
        rule = LabelSetRule.fit(probabilities, labels, gold, default=decision.threshold)
        self.memory.store.save_fitted(key, rule.to_dict(), self.memory.n_examples)
        logger.info("label thresholds fitted on %d held-out items", rule.heldout_items)
        return rule

    def _heldout_fit_key(
        self, kind: str, k: int, scorer: str, weights: FusionWeights | None, *extra: object
    ) -> str:
        """Key of parameters fitted on :meth:`_heldout_decisions` for these ``weights``."""
        uses_llm = weights is not None and weights.uses_llm
        settings = self.config.calibration
        return self._fitted_key(
            kind,
            k,
            scorer,
            uses_llm,
            # The decision scores are the weights times the ECL's (and the LLM's): a fit for the
            # ECL alone does not hold for the fused classifier, even when its LLM weight is 0.
            None if weights is None else [round(weights.ecl, 12), round(weights.llm, 12)],
            settings.probability,
            settings.heldout_llm if uses_llm else settings.heldout,
            *extra,
        )

    def _fresh_fitted(self, key: str) -> dict[str, Any] | None:
        """Parameters stored under ``key``, if they were fitted at the store's current size."""
        stored = self.memory.store.fitted(key)
        return stored[0] if stored is not None and stored[1] == self.memory.n_examples else None

    def _heldout_decisions(self, k: int, scorer: str, weights: FusionWeights | None) -> _Decisions:
        """Held-out items' decision scores under fusion ``weights`` (``None``: the ECL alone),
        gold columns and labels: what the calibration and the label-set rule are fitted on.

        With the LLM in use, ``calibration.heldout_llm`` items read by the LLM (at least the
        fusion's, whose readings are cached and reused); otherwise
        ``calibration.heldout`` items scored by the ECL with their own statistics subtracted
        (kept for the next fit at this store size).
        """
        if weights is not None and weights.uses_llm:
            # More items than the fusion's two weights need: a calibration fitted on a hundred
            # read items missed ECE 0.05 on Debian sections (see README).
            n = max(self.config.fusion.heldout, self.config.calibration.heldout_llm)
            ecl, llm, gold, labelled = self._heldout_readings(k, scorer, n)
            return [weights.combine(e, m) for e, m in zip(ecl, llm, strict=True)], gold, labelled
        n = self.config.calibration.heldout
        if self._infers():  # every held-out item costs an LLM generation
            n = min(n, self.config.fusion.heldout)
        key = f"{self._fitted_key('heldout', k, scorer, n)}:{self.memory.n_examples}"
        if self._ecl_heldout is None or self._ecl_heldout[0] != key:
            examples, _, ranked, _ = self._heldout(n, scorer, k)
            kept = [i for i, c in enumerate(ranked) if c]
            ranked, examples = [ranked[i] for i in kept], [examples[i] for i in kept]
            ecl = [np.array([s for _, s in c]) for c in ranked]
            found = (ecl, _gold_columns(ranked, examples), _labelled(ranked, examples))
            self._ecl_heldout = (key, found)
        ecl, gold, labelled = self._ecl_heldout[1]
        scale = weights.ecl if weights is not None else 1.0
        return [scale * s for s in ecl], gold, labelled

    def _heldout(
        self, n: int, scorer: str, k: int
    ) -> tuple[list[Example], np.ndarray, list[list[tuple[str, float]]], list[frozenset[str]]]:
        """``n`` stored items drawn with the fusion seed, their vectors, their top-k candidates as
        if they had never been learned, and the ids of the stored examples each stands for.

        They are held out in folds of at most a tenth of the store, so each is scored by a
        memory almost as large as the real one (small stores are not made to look worse). In a
        multi-label store, an item learned in several sessions (each time with that session's
        labels) is stored several times: its copies are held out together, and its gold labels
        are all of theirs, or the held-out item would find itself in memory and miss labels.
        """
        rng = np.random.default_rng(self.config.fusion.seed)
        total = self.memory.n_examples
        # A prefix of one seeded permutation: a larger held-out set contains the smaller ones,
        # so the calibration's extra LLM reads reuse the fusion's (cached) ones.
        rows = np.sort(rng.permutation(total)[: min(n, total)]).tolist()
        groups = self._copies(rows) if self.memory.multi_label else [[r] for r in rows]
        firsts = [g[0] for g in groups]
        stored = self.memory.store.examples([r for g in groups for r in g])
        by_row = dict(zip([r for g in groups for r in g], stored, strict=True))
        examples = [
            Example(
                by_row[g[0]].id,
                by_row[g[0]].text,
                dict.fromkeys(lab for r in g for lab in by_row[r].labels),
                image=by_row[g[0]].image,
            )
            for g in groups
        ]
        ids = [frozenset(by_row[r].id for r in g) for g in groups]
        vectors = self.memory.index.vectors(firsts)
        fold = max(1, min(_HELDOUT_FOLD, total // 10))

        def rank_ecl(queries: np.ndarray) -> list[list[tuple[str, float]]]:
            ranked: list[list[tuple[str, float]]] = []
            for lo in range(0, len(groups), fold):
                part = [r for g in groups[lo : lo + fold] for r in g]
                scores = self.memory.heldout_scorer(part, scorer).scores(queries[lo : lo + fold])
                ranked += self.memory.ranked(scores, k)
            return ranked

        ranked, _ = self._candidates(
            [ex.item for ex in examples], vectors, k, rank_ecl, exclude=ids
        )
        return examples, vectors, ranked, ids

    def _candidates(
        self,
        texts: Sequence[str | Image] | None,
        vectors: np.ndarray,
        k: int,
        rank_ecl: Callable[[np.ndarray], list[list[tuple[str, float]]]],
        exclude: Sequence[frozenset[str]] | None = None,
    ) -> tuple[list[list[tuple[str, float]]], Inferred | None]:
        """Each input's top-``k`` candidates: the ECL's (``rank_ecl``), or with Infer-Retrieve-Rank
        configured, its infer and retrieve steps (infer needs ``texts`` and the LLM)."""
        if self.config.irr is None:
            return rank_ecl(vectors), None
        irr = InferRetrieveRank(self, self.config.irr)
        return irr.candidates(texts if self._infers() else None, vectors, k, rank_ecl, exclude)

    def _infers(self) -> bool:
        """Whether candidates come with an LLM infer step (Infer-Retrieve-Rank)."""
        return self.config.irr is not None and self.config.irr.infer and self.config.llm is not None

    def _reads(self) -> bool:
        """Whether the LLM reads the candidates (InCA, or Infer-Retrieve-Rank's rank step)."""
        return self.config.irr is None or self.config.irr.rank

    def _copies(self, rows: list[int]) -> list[list[int]]:
        """For each row, every stored row with the same input (one group per distinct text or
        image)."""
        texts = self.memory.store.input_keys()
        by_text: dict[str, list[int]] = {}
        for row, text in enumerate(texts):
            by_text.setdefault(text, []).append(row)
        return [by_text[t] for t in dict.fromkeys(texts[r] for r in rows)]

    def _heldout_readings(self, k: int, scorer: str, n: int) -> _Readings:
        """ECL and LLM scores of ``n`` held-out items, and their gold columns (read once per store
        size, setting and ``n``; the LLM calls are cached, so the fusion's items are not read
        again when the calibration asks for more)."""
        key = f"{self._fitted_key('readings', k, scorer, n)}:{self.memory.n_examples}"
        if self._readings is not None and self._readings[0] == key:
            return self._readings[1]
        result = self._read_heldout(k, scorer, n)
        self._readings = (key, result)
        return result

    def _read_heldout(self, k: int, scorer: str, n: int) -> _Readings:
        examples, vectors, ranked, ids = self._heldout(n, scorer, k)
        cand_labels = [[label for label, _ in c] for c in ranked]
        logger.info("reading %d held-out stored examples with the LLM", len(examples))
        readings = (
            self.reader()
            .read(
                [ex.item for ex in examples],
                vectors,
                cand_labels,
                exclude=ids,
            )
            .readings
        )
        failed = [
            r.fallback for r in readings if r.fallback and r.fallback.startswith("backend error")
        ]
        if failed and len(failed) == len(readings):
            raise BackendError(failed[0].removeprefix("backend error: "))
        ecl = [np.array([s for _, s in c]) for c in ranked]
        llm = [
            r.scores if r.scores is not None else np.full(len(c), -np.inf)
            for r, c in zip(readings, ranked, strict=True)
        ]
        return ecl, llm, _gold_columns(ranked, examples), _labelled(ranked, examples)

    def write_summaries(
        self, labels: Sequence[str] | None = None, n_examples: int = 5
    ) -> dict[str, str]:
        """InCA class summaries: the LLM describes each label from a few of its stored examples.

        Stored in the store; ``labels=None`` (re)writes every label that has examples.
        """
        backend = self.backend()
        template = load_template("summarize_label")
        stats = self.memory.stats
        targets = [lab for lab in self.memory.labels if labels is None or lab.label in set(labels)]
        targets = [lab for lab in targets if stats.counts[stats.col[lab.label]] > 0]
        prompts = []
        means = stats.means()
        for lab in targets:
            mean = means[stats.col[lab.label]].astype(np.float32)
            demos = self.memory.demonstrations(
                mean / max(float(np.linalg.norm(mean)), 1e-12), [lab.label], n_examples
            )
            prompts.append(
                render_instruction(
                    backend, template, label=lab, demonstrations=[{"text": d.text} for d in demos]
                )
            )
        if not prompts:
            return {}
        generations = backend.generate(prompts, GenerationParams(max_tokens=48, stop=("\n",)))
        summaries = {
            lab.label: g.text.strip()
            for lab, g in zip(targets, generations, strict=True)
            if g.text.strip()
        }
        self.memory.store.save_summaries(summaries, backend.model)
        return summaries

    # ---- introspection ---------------------------------------------------------------------

    def labels(self) -> list[dict[str, Any]]:
        """Known labels with their example counts and the session that introduced them."""
        sessions = self.memory.store.label_sessions()
        counts = self.memory.stats.counts
        return [
            {
                "label": lab.label,
                "name": lab.name,
                "group": lab.group,
                "count": int(counts[i]),
                "session": sessions.get(lab.label),
            }
            for i, lab in enumerate(self.memory.labels)
        ]

    def info(self) -> dict[str, Any]:
        """Config, model, sizes and sessions of the store."""
        store = self.memory.store
        size = sum(f.stat().st_size for f in Path(store.path).iterdir() if f.is_file())
        return {
            **self.memory.info(),
            "format_version": store.manifest["format_version"],
            "created_by": store.manifest["created_by"],
            "embedder": store.manifest["embedder"],
            "bytes_on_disk": size,
            "config": self.config.model_dump(mode="json"),
            "sessions": [
                {
                    "session": s.session,
                    "created_at": s.created_at,
                    "examples": s.n_examples,
                    "new_labels": len(s.new_labels),
                    "seconds": round(s.seconds, 3),
                }
                for s in self.memory.sessions()
            ],
        }


def _gold_columns(
    ranked: Sequence[Sequence[tuple[str, float]]], examples: Sequence[Example]
) -> list[list[int]]:
    """Per held-out item, the candidate columns of its gold labels, ``-1`` for each gold label
    outside the candidates."""
    out = []
    for cands, ex in zip(ranked, examples, strict=True):
        position = {label: j for j, (label, _) in enumerate(cands)}
        out.append([position.get(label, -1) for label in ex.labels])
    return out


def _labelled(
    ranked: Sequence[Sequence[tuple[str, float]]], examples: Sequence[Example]
) -> _Labelled:
    """Per held-out item, its candidate labels and its gold labels."""
    return [[label for label, _ in c] for c in ranked], [set(ex.labels) for ex in examples]
