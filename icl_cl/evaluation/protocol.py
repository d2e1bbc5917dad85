"""The class-incremental protocol: learn sessions one by one, test on all labels seen so far.

A run folder holds everything needed to resume a killed run without redoing finished work:
``embeddings/`` (vectors by text), ``llm_cache.sqlite`` (every LLM call, shared by all stages and
methods), ``stores/incremental`` (the learned store: its sessions say how many are learned) and
``checkpoint.json`` (each finished (method, session) cell).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from icl_cl import metrics
from icl_cl.config import ClassifierConfig
from icl_cl.embedding import Embedder, load_embedder
from icl_cl.embedding.cache import CachedEmbedder
from icl_cl.errors import ConfigError
from icl_cl.evaluation.checkpoint import Checkpoint, fingerprint
from icl_cl.evaluation.datasets import Dataset, DatasetSpec, load_dataset, sample_items
from icl_cl.evaluation.llm_pool import BackendFactory, BackendPool
from icl_cl.evaluation.methods import (
    LLM_KINDS,
    Decision,
    MethodOutput,
    MethodSpec,
    StageContext,
    method_config,
    run_method,
)
from icl_cl.evaluation.sessions import SessionSpec, session_examples, split_sessions
from icl_cl.pipelines.continual import ContinualClassifier
from icl_cl.types import Example

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``; the CLI draws bars from it."""

STORES = "stores"
EMBEDDINGS = "embeddings"


class EvalConfig(BaseModel):
    """A whole protocol run: data, session split, methods, and the classifier config."""

    model_config = ConfigDict(extra="forbid")
    name: str
    dataset: DatasetSpec
    sessions: SessionSpec = SessionSpec()
    methods: list[MethodSpec] = Field(min_length=1)
    k: int = Field(10, gt=0, description="candidates per prediction")
    classifier: ClassifierConfig = ClassifierConfig()
    joint_check: bool = Field(True, description="also learn all sessions at once and compare")
    llm_max_test: int | None = Field(
        None,
        gt=0,
        description="test items per stage for LLM methods without their own max_test (budget)",
    )
    confidence: float | None = Field(
        0.9,
        gt=0,
        lt=1,
        description="conformal sets at this coverage: report coverage and set size (null: off)",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> EvalConfig:
        names = [m.name for m in self.methods]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"method names must be unique; repeated: {twice}")
        return self

    @classmethod
    def from_dict(cls, data: Any, source: str = "eval config") -> EvalConfig:
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: invalid eval config: {exc}") from exc
        for m in config.methods:  # method overrides are checked before any work starts
            method_config(config.classifier, m, source)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> EvalConfig:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read eval config: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    def with_limits(self, max_train: int | None, max_test: int | None) -> EvalConfig:
        """A copy using at most ``max_train`` / ``max_test`` items (smoke runs)."""

        def cap(old: int | None, new: int | None) -> int | None:
            return old if new is None else new if old is None else min(old, new)

        dataset = self.dataset.model_copy(
            update={
                "max_train": cap(self.dataset.max_train, max_train),
                "max_test": cap(self.dataset.max_test, max_test),
            }
        )
        return self.model_copy(update={"dataset": dataset})

    def method_k(self, method: Any) -> int:
        return method.k or self.k

    def budget(self, method: Any) -> int | None:
        """Test items per stage for ``method`` (``None``: all)."""
        if method.max_test is not None:
            return method.max_test
        return self.llm_max_test if method.kind in LLM_KINDS else None


def headline(multi_label: bool) -> str:
    return "rp@5" if multi_label else "accuracy"


def _restrict(test: Sequence[Example], labels: set[str]) -> list[Example]:
    """Test items that have a gold label in ``labels``, with gold restricted to them."""
    out = []
    for ex in test:
        gold = [lab for lab in ex.labels if lab in labels]
        if gold:
            out.append(Example(ex.id, ex.text, gold, image=ex.image))
    return out


def score_decisions(
    gold: Sequence[Example],
    decisions: Sequence[Decision],
    multi_label: bool,
    k: int,
    full_scores: np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Quality metrics of one method on one test set.

    mAP ranks items by each label's score: from ``full_scores`` (every label) when given, else
    from the decision's ranked scores (labels a method did not rank score ``-inf``).
    """
    gold_sets = [set(ex.labels) for ex in gold]
    rankings = [list(d.ranking) for d in decisions]
    if not multi_label:
        return {
            "accuracy": metrics.accuracy(
                [ex.labels[0] for ex in gold], [d.labels[0] if d.labels else "" for d in decisions]
            ),
            f"recall@{k}": metrics.top_k_accuracy([ex.labels[0] for ex in gold], rankings, k),
            **calibration_metrics(gold_sets, decisions, multi_label),
        }
    predicted = [set(d.labels) for d in decisions]
    seen = sorted(set().union(*gold_sets))
    out = {
        "rp@5": metrics.rank_precision_at_k(gold_sets, rankings, 5),
        "rp@10": metrics.rank_precision_at_k(gold_sets, rankings, 10),
        "p@5": metrics.precision_at_k(gold_sets, rankings, 5),
        "micro_f1": metrics.micro_f1(gold_sets, predicted),
        "macro_f1": metrics.macro_f1(gold_sets, predicted, labels=seen),
        f"recall@{k}": metrics.recall_at_k(gold_sets, rankings, k),
    }
    if full_scores is not None and label_names is not None:
        finite = np.where(np.isfinite(full_scores), full_scores, -1e30)
        score_dicts = [dict(zip(label_names, row.tolist(), strict=True)) for row in finite]
    else:
        score_dicts = [
            {lab: max(s, -1e30) for lab, s in zip(d.ranking, d.scores, strict=True)}
            for d in decisions
        ]
    out["map"] = metrics.mean_average_precision(gold_sets, score_dicts, seen)
    out.update(calibration_metrics(gold_sets, decisions, multi_label))
    return out


def calibration_metrics(
    gold: Sequence[set[str]], decisions: Sequence[Decision], multi_label: bool
) -> dict[str, float]:
    """ECE of the probabilities, and coverage and size of the conformal sets, when given.

    Single-label: top-1 ECE, and the share of items whose gold label is in the set.
    Multi-label: ECE over every (item, ranked label) pair, and the share of gold labels in sets.
    """
    out: dict[str, float] = {}
    if decisions and all(d.probabilities is not None and d.ranking for d in decisions):
        if multi_label:
            probs = [dict(zip(d.ranking, d.probabilities, strict=True)) for d in decisions]  # type: ignore[arg-type]
            out["ece"] = metrics.multilabel_ece(gold, probs)
        else:
            top = [float(d.probabilities[0]) for d in decisions]  # type: ignore[index]
            correct = [d.ranking[0] in g for d, g in zip(decisions, gold, strict=True)]
            out["ece"] = metrics.expected_calibration_error(top, correct)
    if decisions and all(d.set is not None for d in decisions):
        sets = [set(d.set or ()) for d in decisions]
        if multi_label:
            covered = sum(len(g & s) for g, s in zip(gold, sets, strict=True))
            out["coverage"] = covered / max(sum(len(g) for g in gold), 1)
        else:
            out["coverage"] = float(np.mean([bool(g & s) for g, s in zip(gold, sets, strict=True)]))
        out["set_size"] = float(np.mean([len(s) for s in sets]))
    return out


def _cell_result(
    output: MethodOutput,
    items: list[Example],
    multi: bool,
    k: int,
    sessions: Sequence[Sequence[str]],
    label_names: Sequence[str],
    seconds: float,
    uses_llm: bool,
) -> dict[str, Any]:
    """Quality next to cost for one (method, session) cell, plus its row of the accuracy matrix."""
    quality = score_decisions(items, output.decisions, multi, k, output.full_scores, label_names)
    # Variants report a few headline numbers only, to keep the tables readable.
    shown = ("rp@5", "micro_f1", "map") if multi else ("accuracy",)
    for prefix, decisions in output.variants.items():
        extra = score_decisions(items, decisions, multi, k)
        quality.update({f"{prefix}_{name}": extra[name] for name in shown})
    n = len(items)
    cost: dict[str, float] = {
        # One-off fitting is reported on its own (fit_seconds), not spread over the items.
        "seconds_per_item": (seconds - output.setup.get("fit_seconds", 0.0)) / n,
        "prompt_tokens_per_item": output.cost.prompt_tokens / n,
        "completion_tokens_per_item": output.cost.completion_tokens / n,
        "llm_calls_per_item": output.cost.calls / n,
    }
    if uses_llm:
        cost["llm_fallbacks"] = float(output.cost.fallbacks)
        cost["prompts_shortened"] = float(output.cost.shortened)
    per_session = []
    for labs in sessions:
        idx = [i for i, ex in enumerate(items) if set(ex.labels) & set(labs)]
        if not idx:
            per_session.append(float("nan"))
            continue
        sub_gold = _restrict([items[i] for i in idx], set(labs))
        sub = [output.decisions[i] for i in idx]
        per_session.append(score_decisions(sub_gold, sub, multi, k)[headline(multi)])
    return {"n_test": n, "metrics": {**quality, **cost, **output.setup}, "per_session": per_session}


def _run_fingerprint(config: EvalConfig, data: Dataset) -> str:
    """What the learned store depends on: a folder made under another one is not reused."""
    return fingerprint(
        {
            "dataset": config.dataset.model_dump(mode="json"),
            "sizes": [data.name, len(data.train), len(data.test)],
            "sessions": config.sessions.model_dump(mode="json"),
            "embedder": config.classifier.embedder.model_dump(mode="json"),
            "multi_label": config.classifier.multi_label,
            "max_text_chars": config.classifier.max_text_chars,
        }
    )


def run_protocol(
    config: EvalConfig,
    out_dir: Path,
    base: Path | None = None,
    progress: Progress | None = None,
    *,
    embedder: Embedder | None = None,
    backend_factory: BackendFactory | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the class-incremental protocol; returns every number (``results.json``).

    Args:
        config: The protocol.
        out_dir: Run folder. Finished work found there is reused (see the module docstring).
        base: Folder that relative dataset paths are resolved against (the config's folder).
        progress: Progress callback.
        embedder: Sentence encoder to use instead of loading the configured one.
        backend_factory: Builds LLM backends (default: the backend registry).
        fresh: Forget the learned stores and finished cells first (caches are kept: they are
            keyed by content and stay valid).
    """
    tick: Progress = progress or (lambda stage, done, total: None)
    data = load_dataset(config.dataset, base)
    multi = data.multi_label
    sessions = split_sessions(config.sessions, data.labels, data.train)
    label_by_name = {lab.label: lab for lab in data.labels}
    streams = [session_examples(data.train, labs, t + 1) for t, labs in enumerate(sessions)]
    configs = {m.name: method_config(config.classifier, m) for m in config.methods}
    logger.info(
        "%s: %d train, %d test, %d sessions",
        data.name,
        len(data.train),
        len(data.test),
        len(sessions),
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    stores = out_dir / STORES
    if fresh:
        shutil.rmtree(stores, ignore_errors=True)
    run_fp = _run_fingerprint(config, data)
    checkpoint = Checkpoint(out_dir, run_fp, fresh=fresh)

    cached = CachedEmbedder(
        embedder or load_embedder(config.classifier.embedder), out_dir / EMBEDDINGS
    )
    # Label texts too: learning embeds them, and a resumed run should embed nothing.
    texts = list(
        dict.fromkeys(
            [ex.item for ex in data.train]
            + [ex.item for ex in data.test]
            + [lab.text for lab in data.labels]
        )
    )
    todo = cached.missing(texts)
    done = 0

    def embedded(n: int) -> None:
        nonlocal done
        done += n
        tick("embedding", done, todo)

    start = time.perf_counter()
    cached.encode(texts, progress=embedded)
    embed_seconds = time.perf_counter() - start

    seen_by_stage, seen = [], set()
    for labs in sessions:
        seen |= set(labs)
        seen_by_stage.append(set(seen))
    tests = [_restrict(data.test, s) for s in seen_by_stage]
    last = len(sessions) - 1
    cell_fp = {
        m.name: fingerprint(
            [
                m.model_dump(mode="json"),
                configs[m.name].model_dump(mode="json"),
                config.method_k(m),
                config.budget(m),
                config.dataset.seed,
            ]
        )
        for m in config.methods
    }

    def planned(m: Any, t: int) -> bool:
        return bool(tests[t]) and (m.evaluate_at == "every_session" or t == last)

    def missing(t: int) -> bool:
        return any(
            planned(m, t) and checkpoint.get(m.name, t + 1, cell_fp[m.name]) is None
            for m in config.methods
        )

    store_path = stores / "incremental"
    clf = ContinualClassifier.open(store_path, config.classifier, embedder=cached)
    learned = len(clf.memory.sessions())
    expected = sum(len(s) for s in streams[:learned])
    first_missing = next((t for t in range(len(sessions)) if missing(t)), None)
    # A missing cell of an earlier stage needs the store as it was then: learn again from the
    # start (embeddings and LLM calls come from the caches).
    if learned and (
        learned > len(sessions)
        or clf.memory.n_examples != expected
        or (first_missing is not None and first_missing < learned - 1)
    ):
        logger.warning("%s: relearning the sessions from the start", store_path)
        clf.close()
        shutil.rmtree(store_path)
        clf = ContinualClassifier.open(store_path, config.classifier, embedder=cached)
        learned = 0
    learned_before = learned

    pool = BackendPool(out_dir, backend_factory)
    total_cells = sum(planned(m, t) for m in config.methods for t in range(len(sessions)))
    cells_done = reused = 0
    n_examples = 0
    cardinality_sum = 0
    try:
        for t, labs in enumerate(sessions):
            if t >= learned:
                clf.learn(streams[t], [label_by_name[lab] for lab in labs if lab in label_by_name])
            n_examples += len(streams[t])
            cardinality_sum += sum(len(ex.labels) for ex in streams[t])
            ctx = StageContext(
                classifier=clf,
                pool=pool,
                multi_label=multi,
                mean_cardinality=cardinality_sum / max(n_examples, 1),
                k=config.k,
            )
            for m in config.methods:
                if not planned(m, t):
                    continue
                if checkpoint.get(m.name, t + 1, cell_fp[m.name]) is not None:
                    reused += 1
                else:
                    result = _evaluate_cell(
                        config,
                        m,
                        configs[m.name],
                        ctx,
                        tests[t],
                        sessions[: t + 1],
                        cached,
                        multi,
                        t,
                        tick,
                    )
                    checkpoint.put(m.name, t + 1, cell_fp[m.name], result)
                cells_done += 1
                tick("cells", cells_done, total_cells)
            tick("sessions", t + 1, len(sessions))
        learn_seconds = sum(s.seconds for s in clf.memory.sessions())
        llm_usage = pool.usage()
    finally:
        clf.close()
        pool.close()

    joint = None
    if config.joint_check:
        joint_fp = fingerprint(
            [
                run_fp,
                [(m.name, getattr(m, "scorer", None), config.method_k(m)) for m in config.methods],
            ]
        )
        joint = checkpoint.get_extra("joint", joint_fp)
        if joint is None:
            joint = _joint_check(config, streams, data, stores, cached)
            checkpoint.put_extra("joint", joint_fp, joint)

    methods: dict[str, dict[str, Any]] = {}
    for m in config.methods:
        cells = {
            t: checkpoint.get(m.name, t + 1, cell_fp[m.name])
            for t in range(len(sessions))
            if planned(m, t)
        }
        methods[m.name] = _summarise(m, cells, tests, seen_by_stage, len(sessions), multi, joint)
    return {
        "name": config.name,
        "config": config.model_dump(mode="json"),
        "dataset": {
            "name": data.name,
            "train": len(data.train),
            "test": len(data.test),
            "labels": len(data.labels),
            "multi_label": multi,
        },
        "sessions": sessions,
        "headline": headline(multi),
        "embed_seconds": embed_seconds,
        "embedded_texts": cached.misses,
        "learn_seconds_excluding_embedding": learn_seconds,
        "resumed": {"sessions_already_learned": learned_before, "cells_reused": reused},
        "llm_usage": llm_usage,
        "methods": methods,
    }


def _evaluate_cell(
    config: EvalConfig,
    method: Any,
    method_cfg: ClassifierConfig,
    ctx: StageContext,
    test: list[Example],
    sessions: Sequence[Sequence[str]],
    embedder: CachedEmbedder,
    multi: bool,
    t: int,
    tick: Progress,
) -> dict[str, Any]:
    # The same seeded sample at a stage for every method with the same budget: comparable cells.
    items = sample_items(test, config.budget(method), config.dataset.seed + t)
    queries = embedder.encode([ex.item for ex in items])
    k = config.method_k(method)
    bar = f"{method.name} after session {t + 1}"
    done = 0

    def items_done(n: int) -> None:
        nonlocal done
        done += n
        if method.kind in LLM_KINDS:
            tick(bar, done, len(items))

    stage_ctx = StageContext(
        ctx.classifier,
        ctx.pool,
        ctx.multi_label,
        ctx.mean_cardinality,
        k,
        items_done,
        config.confidence,
    )
    start = time.perf_counter()
    output = run_method(method, stage_ctx, method_cfg, items, queries)
    seconds = time.perf_counter() - start
    return _cell_result(
        output,
        items,
        multi,
        k,
        sessions,
        ctx.classifier.memory.stats.labels,
        seconds,
        method.kind in LLM_KINDS,
    )


def _summarise(
    method: Any,
    cells: dict[int, dict[str, Any] | None],
    tests: list[list[Example]],
    seen_by_stage: list[set[str]],
    n_sessions: int,
    multi: bool,
    joint: dict[str, float] | None,
) -> dict[str, Any]:
    stages = []
    r = np.full((n_sessions, n_sessions), np.nan)
    for t, cell in sorted(cells.items()):
        assert cell is not None, "every planned cell is finished by now"
        stages.append(
            {
                "session": t + 1,
                "n_test": cell["n_test"],
                "labels_seen": len(seen_by_stage[t]),
                **cell["metrics"],
            }
        )
        r[t, : t + 1] = cell["per_session"]
    summary: dict[str, Any] = {}
    if stages:
        scores = [s[headline(multi)] for s in stages]
        summary = {
            "average_incremental": metrics.average_incremental_accuracy(scores),
            "last": metrics.last_accuracy(scores),
        }
        # Forgetting needs every session's row (a method tested only at the end has none).
        for name, fn in (("forgetting", metrics.forgetting), ("bwt", metrics.backward_transfer)):
            try:
                summary[name] = fn(r) if len(stages) == n_sessions else None
            except ValueError:
                summary[name] = None
        summary.update({key: v for key, v in stages[-1].items() if key != "session"})
    if joint is not None and method.name in joint:
        summary["joint_agreement"] = joint[method.name]
    return {
        "spec": method.model_dump(mode="json"),
        "stages": stages,
        "R": [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in r],
        "summary": summary,
    }


def _joint_check(
    config: EvalConfig,
    streams: list[list[Example]],
    data: Dataset,
    stores: Path,
    embedder: CachedEmbedder,
) -> dict[str, float]:
    """Learn every session's stream at once; per method with ECL candidates, the share of test
    items whose ranked candidates match the incremental store's exactly (1.0: no difference)."""
    shutil.rmtree(stores / "joint", ignore_errors=True)  # a half-made one from a killed run
    joint = ContinualClassifier.open(stores / "joint", config.classifier, embedder=embedder)
    incremental = ContinualClassifier.open(
        stores / "incremental", config.classifier, embedder=embedder
    )
    try:
        joint.learn([ex for stream in streams for ex in stream], data.labels)
        queries = embedder.encode([ex.item for ex in data.test])
        agreement = {}
        for m in config.methods:
            if not hasattr(m, "scorer"):
                continue
            k = config.method_k(m)
            a = joint.predict_vectors(queries, k, scorer=m.scorer)
            b = incremental.predict_vectors(queries, k, scorer=m.scorer)
            same = [
                [c.label for c in x.candidates] == [c.label for c in y.candidates]
                for x, y in zip(a, b, strict=True)
            ]
            agreement[m.name] = float(np.mean(same))
    finally:
        joint.close()
        incremental.close()
    return agreement
