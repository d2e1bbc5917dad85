"""The methods the protocol compares, each reusing :class:`ContinualClassifier`.

- ``ecl``: the external continual learner alone, with one scorer.
- ``inca``: ECL top-k candidates read by the LLM (demonstrations from memory); the decision is
  the fused one, and the LLM's own choice among the same candidates is scored alongside.
- ``zero_shot``: the LLM alone, every seen label listed, no demonstrations.
- ``rag_icl``: Milios et al. (2023), see :mod:`icl_cl.evaluation.rag_icl`.
- ``irr``: Infer-Retrieve-Rank (D'Oosterlinck et al. 2024), optionally with the ECL fused into
  retrieval; see :mod:`icl_cl.candidates.infer_retrieve_rank`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from icl_cl.classifier import ContinualClassifier
from icl_cl.config import ClassifierConfig
from icl_cl.evaluation.llm_pool import SharedBackend
from icl_cl.evaluation.outputs import Decision, MethodOutput, StageContext, chunks
from icl_cl.evaluation.rag_icl import run_rag_icl
from icl_cl.evaluation.specs import EclMethod, IncaMethod, IrrMethod, ZeroShotMethod
from icl_cl.reading import Reading
from icl_cl.types import Example, Prediction


def view(ctx: StageContext, config: ClassifierConfig) -> ContinualClassifier:
    """The run's learned classifier under one method's query-time config, with the run's pooled
    LLM: it shares the learner (no reload of statistics or index), and the store and the
    backend stay the run's."""
    assert config.llm is not None
    classifier = ctx.classifier
    backend = ctx.pool.get(config.llm)
    return ContinualClassifier(classifier.memory, classifier.embedder, config, backend=backend)


# mAP ranks the test items by every label's score up to this many labels; above it (an extreme
# label space, where items times labels does not fit in memory) by the scores of each item's
# ranked candidates, the others counting as -inf.
FULL_SCORES_MAX_LABELS = 2048


# ---- the methods -------------------------------------------------------------------------


def _fit(clf: ContinualClassifier, ctx: StageContext, scorer: str) -> dict[str, float]:
    """Fit (or load) the heads on held-out stored examples; what it cost."""
    backend = clf.backend()
    assert isinstance(backend, SharedBackend)
    before, start = backend.requests, time.perf_counter()
    heads = clf.fit(ctx.k, scorer=scorer, progress=ctx.fit_progress)
    return {
        "fit_llm_calls": float(backend.requests - before),
        "fit_seconds": time.perf_counter() - start,
        "fusion_llm_weight": heads.llm_weight,
        "fusion_heldout_items": heads.fusion.heldout_items if heads.fusion else 0,
    }


def run_ecl(
    spec: EclMethod, ctx: StageContext, test: Sequence[Example], queries: np.ndarray
) -> MethodOutput:
    clf = ctx.classifier
    clf.fit(ctx.k, scorer=spec.scorer, use_llm=False)
    preds = clf.predict_vectors(queries, ctx.k, scorer=spec.scorer, confidence=ctx.confidence)
    ctx.progress(len(test))
    full = ctx.multi_label and len(clf.memory.labels) <= FULL_SCORES_MAX_LABELS
    return MethodOutput(
        decisions=[Decision.from_prediction(p) for p in preds],
        full_scores=clf.memory.score_matrix(queries, spec.scorer) if full else None,
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
    setup = _fit(clf, ctx, scorer)
    # As predict: an LLM that fusion gave weight 0 reads nothing, unless the run asks for the
    # LLM's own choice (the llm_* columns) all the same.
    read = setup["fusion_llm_weight"] > 0 or ctx.score_llm_alone
    variants: dict[str, list[Decision]] = {"llm": [], "ecl": []} if read else {"ecl": []}
    out = MethodOutput(decisions=[], variants=variants, setup=setup)
    reader = clf.reader()
    for part in chunks(len(test)):
        texts, q = [ex.item for ex in test[part]], queries[part]
        preds = clf.predict_vectors(q, ctx.k, scorer=scorer, texts=texts, confidence=ctx.confidence)
        ranked = clf.memory.candidates(q, ctx.k, scorer)
        # The same prompts the fused prediction sent (a cache hit then), or, at weight 0, the
        # LLM's reading for its own choice alone.
        labels = [[lab for lab, _ in r] for r in ranked]
        readings = reader.read(texts, q, labels).readings if read else [None] * len(texts)
        for pred, cands, reading in zip(preds, ranked, readings, strict=True):
            _add_inca_item(out, pred, cands, reading)
        ctx.progress(len(texts))
    return out


def _add_inca_item(
    out: MethodOutput, pred: Prediction, cands: list[tuple[str, float]], reading: Reading | None
) -> None:
    """One item's fused decision, the ECL's alone and, with a ``reading``, the LLM's alone."""
    n_chosen = len(pred.labels)
    labels = [lab for lab, _ in cands]
    out.decisions.append(Decision.from_prediction(pred))
    ecl = np.array([s for _, s in cands])
    out.variants["ecl"].append(Decision.from_scores(labels, ecl, n_chosen))
    if reading is None:  # not read: the prediction's own cost (no LLM call at weight 0)
        out.cost.count_prediction(pred)
        return
    if reading.scores is None:  # no reading: the LLM-alone answer falls back to the ECL
        out.cost.fallbacks += 1
        out.variants["llm"].append(out.variants["ecl"][-1])
    else:
        out.variants["llm"].append(Decision.from_scores(labels, reading.scores, n_chosen))
    out.cost.count(reading)


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
    setup = _fit(clf, ctx, scorer)
    if config.irr.rank:  # without the rank step the LLM has no fusion weight to report
        out.setup = setup
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
    return run_rag_icl(spec, ctx, view(ctx, config), test, queries)
