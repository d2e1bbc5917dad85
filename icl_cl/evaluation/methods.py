"""The methods the protocol compares, each reusing :class:`ContinualClassifier`.

- ``ecl``: the external continual learner alone, with one scorer.
- ``inca``: ECL top-k candidates read by the LLM (demonstrations from memory); the decision is
  the fused one, and the LLM's own choice among the same candidates is scored alongside.
- ``zero_shot``: the LLM alone, every seen label listed, no demonstrations.
- ``rag_icl``: Milios et al. (2023), see :mod:`icl_cl.evaluation.rag_icl`.
- ``irr``: Infer-Retrieve-Rank (D'Oosterlinck et al. 2024), optionally with the ECL fused into
  retrieval; see :mod:`icl_cl.pipelines.infer_retrieve_rank`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from icl_cl.config import ClassifierConfig, ScorerName
from icl_cl.errors import ConfigError
from icl_cl.evaluation.llm_pool import BackendPool, SharedBackend
from icl_cl.pipelines.continual import ContinualClassifier
from icl_cl.pipelines.reader import Reading
from icl_cl.types import Example, Prediction

# Items read per LLM batch: small enough for a smooth progress bar, large enough to batch.
CHUNK = 32


class _Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    k: int | None = Field(None, gt=0, description="candidates per item; default: the protocol's k")
    max_test: int | None = Field(
        None, gt=0, description="test items per stage (a seeded sample); default: all"
    )
    evaluate_at: Literal["every_session", "last_session"] = "every_session"


class EclMethod(_Method):
    """The ECL alone."""

    kind: Literal["ecl"] = "ecl"
    scorer: ScorerName | Literal["auto"] = "auto"


class _LLMMethod(_Method):
    llm: dict[str, Any] = Field(default_factory=dict, description="overrides of classifier.llm")
    prompt: dict[str, Any] = Field(
        default_factory=dict, description="overrides of classifier.prompt (demonstrations, ...)"
    )
    classifier: dict[str, Any] = Field(
        default_factory=dict, description="any other classifier override, merged key by key"
    )


class IncaMethod(_LLMMethod):
    """ECL candidates + LLM reading them; the fused decision."""

    kind: Literal["inca"]
    scorer: ScorerName | Literal["auto"] = "auto"


class ZeroShotMethod(_LLMMethod):
    """The LLM alone with every seen label listed (k = labels seen), no demonstrations."""

    kind: Literal["zero_shot"]


class RagIclMethod(_LLMMethod):
    """Retrieval-augmented ICL with all labels (Milios et al., 2023)."""

    kind: Literal["rag_icl"]
    n_demonstrations: int = Field(
        32,
        ge=0,
        le=50,
        description="nearest stored examples offered; the budget decides how many fit",
    )
    context_budget: int = Field(1024, gt=0, description="prompt tokens the demonstrations fill")
    max_new_tokens: int = Field(16, gt=0)


class IrrMethod(_LLMMethod):
    """Infer-Retrieve-Rank: LLM queries, label retrieval, LLM rank; the fused decision."""

    kind: Literal["irr"]
    scorer: ScorerName | Literal["auto"] = "auto"
    irr: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of classifier.irr (infer, retrieve, ecl, rank, prior, ...)",
    )


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", "ecl"))
    return str(getattr(value, "kind", "ecl"))


MethodSpec = Annotated[
    Annotated[EclMethod, Tag("ecl")]
    | Annotated[IncaMethod, Tag("inca")]
    | Annotated[ZeroShotMethod, Tag("zero_shot")]
    | Annotated[RagIclMethod, Tag("rag_icl")]
    | Annotated[IrrMethod, Tag("irr")],
    Discriminator(_kind),
]
"""One method of the comparison; ``kind`` picks it (default ``ecl``)."""

LLM_KINDS = ("inca", "zero_shot", "rag_icl", "irr")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged into ``base`` key by key (nested dicts merged, anything else replaced)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def method_config(
    base: ClassifierConfig, spec: Any, source: str = "eval config"
) -> ClassifierConfig:
    """The classifier config a method runs with: the protocol's, with the method's overrides."""
    if spec.kind == "ecl":
        return base
    data = base.model_dump(mode="json")
    merged = deep_merge(data, spec.classifier)
    if spec.prompt:
        merged["prompt"] = deep_merge(merged.get("prompt") or {}, spec.prompt)
    if spec.llm:
        merged["llm"] = deep_merge(merged.get("llm") or {}, spec.llm)
    if spec.kind == "zero_shot":
        merged["prompt"] = {**merged["prompt"], "demonstrations": "none", "n_demonstrations": 0}
    if spec.kind == "irr":
        merged["irr"] = deep_merge(merged.get("irr") or {}, spec.irr)
    where = f"{source}: method {spec.name!r}"
    unknown = sorted(set(merged) - set(ClassifierConfig.model_fields))
    if unknown:
        raise ConfigError(
            f"{where}: the classifier config has no field {unknown[0]!r} "
            f"(fields: {', '.join(ClassifierConfig.model_fields)})"
        )
    if merged.get("memory") != data.get("memory"):
        raise ConfigError(f"{where}: per-method memory settings are not supported; use 'scorer'")
    try:
        config = ClassifierConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(f"{where}: invalid override: {exc}") from exc
    if config.llm is None:
        raise ConfigError(
            f"{where}: kind {spec.kind!r} needs an LLM; set classifier.llm in the eval config "
            "or 'llm: {backend, model}' in the method"
        )
    return config


# ---- what a method returns ---------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """One item's answer: the decided labels and a ranking of labels with their scores, plus
    calibrated probabilities (aligned with ``ranking``) and a conformal set when the method
    gives them."""

    labels: tuple[str, ...]
    ranking: tuple[str, ...]
    scores: tuple[float, ...]
    probabilities: tuple[float, ...] | None = None
    set: tuple[str, ...] | None = None

    @classmethod
    def from_prediction(cls, pred: Prediction) -> Decision:
        return cls(
            pred.labels,
            tuple(c.label for c in pred.candidates),
            tuple(c.score for c in pred.candidates),
            tuple(pred.scores[c.label] for c in pred.candidates),
            pred.set,
        )

    @classmethod
    def from_scores(cls, labels: Sequence[str], scores: np.ndarray, n_chosen: int) -> Decision:
        """Rank by score (ties keep the given order) and decide the top ``n_chosen``."""
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
        ranking = tuple(labels[j] for j in order)
        return cls(ranking[: max(1, n_chosen)], ranking, tuple(float(scores[j]) for j in order))


@dataclass
class Cost:
    """LLM work summed over a stage's items (cache hits count: they are the method's cost)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fallbacks: int = 0
    shortened: int = 0

    def count(self, reading: Reading) -> None:
        """Add one reading's prompt (with any calibration stand-ins read beside it)."""
        if reading.prompt is not None:
            self.calls += 1
            self.prompt_tokens += reading.prompt.tokens + reading.calibration_tokens
            self.shortened += reading.prompt.shortened is not None

    def count_prediction(self, pred: Prediction) -> None:
        """Add the LLM work a prediction reports (every step of its pipeline)."""
        if pred.llm is not None:
            self.calls += pred.llm["calls"]
            self.prompt_tokens += pred.llm["prompt_tokens"]
            self.completion_tokens += pred.llm["completion_tokens"]
            # Fusion giving the LLM weight 0 is a decision, not a failure to read.
            weighted = pred.evidence.get("fusion", {}).get("llm", 1.0) > 0
            self.fallbacks += pred.llm["fallback"] is not None and weighted
            self.shortened += "shortened" in pred.evidence


@dataclass
class MethodOutput:
    """Decisions of a method on one stage's test items, with its cost.

    Attributes:
        decisions: The method's decisions, aligned with the test items.
        variants: Other decisions the same work gave for free, scored as extra metrics with
            the key as prefix (``llm``: the LLM's own choice; ``ecl``: the ECL on these items).
        cost: LLM work for the test items.
        setup: One-off work of the stage (e.g. fitting fusion weights), not per item.
        full_scores: Scores of every label (ECL scorers only), for mAP.
    """

    decisions: list[Decision]
    variants: dict[str, list[Decision]] = field(default_factory=dict)
    cost: Cost = field(default_factory=Cost)
    setup: dict[str, float] = field(default_factory=dict)
    full_scores: np.ndarray | None = None


@dataclass
class StageContext:
    """What every method needs to evaluate one stage."""

    classifier: ContinualClassifier
    pool: BackendPool
    multi_label: bool
    mean_cardinality: float
    k: int
    progress: Callable[[int], None] = lambda n: None
    confidence: float | None = None


class _View(ContinualClassifier):
    """The run's learned classifier under one method's query-time config, with a pooled LLM.

    It shares the learner (no reload of statistics or index); closing it closes nothing.
    """

    def __init__(self, base: ContinualClassifier, config: ClassifierConfig, backend: SharedBackend):
        super().__init__(base.memory, base.embedder, config)
        self._backend = backend

    def close(self) -> None:
        """The store and the backend belong to the run."""


def view(ctx: StageContext, config: ClassifierConfig) -> ContinualClassifier:
    assert config.llm is not None
    return _View(ctx.classifier, config, ctx.pool.get(config.llm))


def chunks(n: int) -> list[slice]:
    return [slice(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]


# ---- the methods -------------------------------------------------------------------------


def _fit_fusion(clf: ContinualClassifier, k: int, scorer: str) -> dict[str, float]:
    """Fit (or load) the fusion weights on held-out stored examples; what it cost."""
    backend = clf.backend()
    assert isinstance(backend, SharedBackend)
    before, start = backend.requests, time.perf_counter()
    weights = clf.fusion_weights(k, scorer)
    return {
        "fit_llm_calls": float(backend.requests - before),
        "fit_seconds": time.perf_counter() - start,
        "fusion_llm_weight": weights.llm,
    }


def run_ecl(
    spec: EclMethod, ctx: StageContext, test: Sequence[Example], queries: np.ndarray
) -> MethodOutput:
    clf = ctx.classifier
    preds = clf.predict_vectors(queries, ctx.k, scorer=spec.scorer, confidence=ctx.confidence)
    ctx.progress(len(test))
    return MethodOutput(
        decisions=[Decision.from_prediction(p) for p in preds],
        full_scores=clf.memory.score_matrix(queries, spec.scorer) if ctx.multi_label else None,
    )


def run_inca(
    spec: IncaMethod,
    ctx: StageContext,
    config: ClassifierConfig,
    test: Sequence[Example],
    queries: np.ndarray,
) -> MethodOutput:
    clf = view(ctx, config)
    scorer = clf.memory.resolve_scorer(spec.scorer)
    out = MethodOutput(
        decisions=[], variants={"llm": [], "ecl": []}, setup=_fit_fusion(clf, ctx.k, scorer)
    )
    reader = clf.reader()
    for part in chunks(len(test)):
        texts, q = [ex.item for ex in test[part]], queries[part]
        preds = clf.predict_vectors(q, ctx.k, scorer=scorer, texts=texts, confidence=ctx.confidence)
        ranked = clf.memory.candidates(q, ctx.k, scorer)
        # The same prompts the fused prediction sent (a cache hit then), or the LLM's reading
        # when fusion gave it weight 0 and it was not asked.
        readings = reader.read(texts, q, [[lab for lab, _ in r] for r in ranked]).readings
        for pred, cands, reading in zip(preds, ranked, readings, strict=True):
            n_chosen = len(pred.labels)
            labels = [lab for lab, _ in cands]
            ecl = np.array([s for _, s in cands])
            out.decisions.append(Decision.from_prediction(pred))
            out.variants["ecl"].append(Decision.from_scores(labels, ecl, n_chosen))
            if reading.scores is None:  # no reading: the LLM-alone answer falls back to the ECL
                out.cost.fallbacks += 1
                out.variants["llm"].append(out.variants["ecl"][-1])
            else:
                out.variants["llm"].append(Decision.from_scores(labels, reading.scores, n_chosen))
            out.cost.count(reading)
        ctx.progress(len(texts))
    return out


def run_zero_shot(
    spec: ZeroShotMethod,
    ctx: StageContext,
    config: ClassifierConfig,
    test: Sequence[Example],
    queries: np.ndarray,
) -> MethodOutput:
    clf = view(ctx, config)
    labels = [lab.label for lab in clf.memory.labels]
    n_chosen = max(1, round(ctx.mean_cardinality)) if ctx.multi_label else 1
    reader = clf.reader()
    out = MethodOutput(decisions=[])
    for part in chunks(len(test)):
        texts = [ex.item for ex in test[part]]
        for reading in reader.read(texts, queries[part], [labels] * len(texts)).readings:
            if reading.scores is None:
                out.cost.fallbacks += 1
                out.decisions.append(Decision((), (), ()))
                continue
            out.decisions.append(Decision.from_scores(labels, reading.scores, n_chosen))
            out.cost.count(reading)
        ctx.progress(len(texts))
    return out


def run_irr(
    spec: IrrMethod,
    ctx: StageContext,
    config: ClassifierConfig,
    test: Sequence[Example],
    queries: np.ndarray,
) -> MethodOutput:
    clf = view(ctx, config)
    assert config.irr is not None
    scorer = clf.memory.resolve_scorer(spec.scorer)
    out = MethodOutput(decisions=[])
    if config.irr.rank:
        out.setup = _fit_fusion(clf, ctx.k, scorer)
    for part in chunks(len(test)):
        texts = [ex.item for ex in test[part]]
        preds = clf.predict_vectors(
            queries[part], ctx.k, scorer=scorer, texts=texts, confidence=ctx.confidence
        )
        for pred in preds:
            out.decisions.append(Decision.from_prediction(pred))
            out.cost.count_prediction(pred)
        ctx.progress(len(texts))
    return out


def run_method(
    spec: Any,
    ctx: StageContext,
    config: ClassifierConfig,
    test: Sequence[Example],
    queries: np.ndarray,
) -> MethodOutput:
    """Evaluate one method on one stage's test items."""
    if spec.kind == "ecl":
        return run_ecl(spec, ctx, test, queries)
    if spec.kind == "inca":
        return run_inca(spec, ctx, config, test, queries)
    if spec.kind == "zero_shot":
        return run_zero_shot(spec, ctx, config, test, queries)
    if spec.kind == "irr":
        return run_irr(spec, ctx, config, test, queries)
    from icl_cl.evaluation.rag_icl import run_rag_icl

    return run_rag_icl(spec, ctx, view(ctx, config), test, queries)
