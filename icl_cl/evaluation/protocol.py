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
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from icl_cl import metrics
from icl_cl.classifier import ContinualClassifier
from icl_cl.config import ClassifierConfig
from icl_cl.embedding import Embedder, load_embedder
from icl_cl.embedding.cache import CachedEmbedder
from icl_cl.errors import ConfigError
from icl_cl.evaluation.checkpoint import Checkpoint, fingerprint
from icl_cl.evaluation.datasets import Dataset, DatasetSpec, load_dataset, sample_items
from icl_cl.evaluation.llm_pool import BackendFactory, BackendPool
from icl_cl.evaluation.methods import run_method
from icl_cl.evaluation.outputs import Decision, MethodOutput, StageContext
from icl_cl.evaluation.sessions import SessionSpec, session_streams, split_sessions
from icl_cl.evaluation.specs import LLM_KINDS, MethodSpec, method_config
from icl_cl.types import Example, Progress

logger = logging.getLogger(__name__)

STORES = "stores"
EMBEDDINGS = "embeddings"


class EvalConfig(BaseModel):
    """A whole protocol run: data, session split, methods, and the classifier config."""

    model_config = ConfigDict(extra="forbid")
    name: str
    protocol: Literal["class_incremental"] = Field(
        "class_incremental", description="active_learning: see evaluation/active_learning.py"
    )
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
    score_llm_alone: bool = Field(
        True,
        description="inca methods also have the LLM read every test item where fusion gave it "
        "weight 0, to score its own choice among the candidates (the llm_* columns; its reads "
        "count in the cost columns); false: they read as predict does, nothing at weight 0",
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
        return cls.from_dict(read_yaml(path), source=str(path))

    def with_limits(self, max_train: int | None, max_test: int | None) -> EvalConfig:
        """A copy using at most ``max_train`` / ``max_test`` items (smoke runs)."""
        return self.model_copy(update={"dataset": limited(self.dataset, max_train, max_test)})

    def method_k(self, method: Any) -> int:
        return method.k or self.k

    def budget(self, method: Any) -> int | None:
        """Test items per stage for ``method`` (``None``: all)."""
        if method.max_test is not None:
            return method.max_test
        return self.llm_max_test if method.kind in LLM_KINDS else None


def read_yaml(path: str | Path) -> Any:
    """The content of an eval config file, with an error naming the file."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read eval config: {exc}") from exc


def limited(dataset: DatasetSpec, max_train: int | None, max_test: int | None) -> DatasetSpec:
    """``dataset`` using at most ``max_train`` / ``max_test`` items (smoke runs)."""

    def cap(old: int | None, new: int | None) -> int | None:
        return old if new is None else new if old is None else min(old, new)

    return dataset.model_copy(
        update={
            "max_train": cap(dataset.max_train, max_train),
            "max_test": cap(dataset.max_test, max_test),
        }
    )


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


@dataclass(frozen=True)
class TrainCounts:
    """What the long-tail metrics know of the training data at a stage.

    Attributes:
        labels: How many training examples of each label were shown up to the stage.
        n_items: The run's training items (``N`` of the propensity model).
    """

    labels: Mapping[str, int]
    n_items: int


def score_decisions(
    gold: Sequence[Example],
    decisions: Sequence[Decision],
    multi_label: bool,
    k: int,
    full_scores: np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
    *,
    train: TrainCounts | None = None,
) -> dict[str, float]:
    """Quality metrics of one method on one test set.

    mAP ranks items by each label's score: from ``full_scores`` (every label) when given, else
    from the decision's ranked scores (labels a method did not rank score ``-inf``). With
    ``train``, multi-label sets also get the long-tail metrics (:func:`tail_metrics`).
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
        "p@1": metrics.precision_at_k(gold_sets, rankings, 1),
        "rp@5": metrics.rank_precision_at_k(gold_sets, rankings, 5),
        "rp@10": metrics.rank_precision_at_k(gold_sets, rankings, 10),
        "p@5": metrics.precision_at_k(gold_sets, rankings, 5),
        "ndcg@5": metrics.ndcg_at_k(gold_sets, rankings, 5),
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
    if train is not None:
        out.update(tail_metrics(gold_sets, rankings, train))
    out.update(calibration_metrics(gold_sets, decisions, multi_label))
    return out


def tail_metrics(
    gold: Sequence[set[str]], rankings: Sequence[Sequence[str]], train: TrainCounts
) -> dict[str, float]:
    """The long-tail metrics of a multi-label test set, where they are defined.

    ``psp@5``: propensity-scored P@5, normalised by the best achievable (needs at least
    :data:`~icl_cl.metrics.PROPENSITY_MIN_TRAIN` training items). ``unseen_recall@10``: the
    share of gold labels with no training example that are in the top 10 (needs one such gold
    label).
    """
    out: dict[str, float] = {}
    if train.n_items >= metrics.PROPENSITY_MIN_TRAIN:
        out["psp@5"] = metrics.propensity_scored_precision_at_k(
            gold, rankings, 5, train.labels, train.n_items
        )
    if any(train.labels.get(lab, 0) == 0 for g in gold for lab in g):
        out["unseen_recall@10"] = metrics.unseen_label_recall_at_k(gold, rankings, 10, train.labels)
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
    few_shot: bool = False,
    train: TrainCounts | None = None,
) -> dict[str, Any]:
    """Quality next to cost for one (method, session) cell, plus its row of the accuracy matrix
    (and, in the few-shot protocol, the base / novel split of :func:`_base_and_novel`)."""
    quality = score_decisions(
        items, output.decisions, multi, k, output.full_scores, label_names, train=train
    )
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
    per_session = [_headline_on(items, output.decisions, labs, multi, k) for labs in sessions]
    if few_shot:
        quality.update(_base_and_novel(items, output.decisions, sessions, multi, k))
    return {"n_test": n, "metrics": {**quality, **cost, **output.setup}, "per_session": per_session}


def _headline_on(
    items: Sequence[Example],
    decisions: Sequence[Decision],
    labels: Collection[str],
    multi: bool,
    k: int,
) -> float:
    """The headline metric on the test items with a gold label in ``labels``, gold restricted
    to them (NaN when there is none)."""
    idx = [i for i, ex in enumerate(items) if set(ex.labels) & set(labels)]
    if not idx:
        return float("nan")
    sub_gold = _restrict([items[i] for i in idx], set(labels))
    return score_decisions(sub_gold, [decisions[i] for i in idx], multi, k)[headline(multi)]


def _base_and_novel(
    items: Sequence[Example],
    decisions: Sequence[Decision],
    sessions: Sequence[Sequence[str]],
    multi: bool,
    k: int,
) -> dict[str, float]:
    """The few-shot summary (FSCIL): the headline metric on base-label test items (the first
    session's labels), on novel-label ones (every later session's) and their harmonic mean;
    the last two only once a novel label is learned."""
    name = headline(multi)
    out = {f"base_{name}": _headline_on(items, decisions, sessions[0], multi, k)}
    novel = {lab for labs in sessions[1:] for lab in labs}
    if novel:
        out[f"novel_{name}"] = _headline_on(items, decisions, novel, multi, k)
        out["harmonic_mean"] = metrics.harmonic_mean(out[f"base_{name}"], out[f"novel_{name}"])
    return out


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


@dataclass
class _Plan:
    """What a run does: its sessions, what each shows and tests, and its cells (one per method
    and session), with the checkpoint that keeps the finished ones."""

    config: EvalConfig
    data: Dataset
    sessions: list[list[str]]
    streams: list[list[Example]]
    seen_by_stage: list[set[str]]
    tests: list[list[Example]]
    configs: dict[str, ClassifierConfig]
    cell_fp: dict[str, str]
    checkpoint: Checkpoint

    @classmethod
    def make(cls, config: EvalConfig, data: Dataset, checkpoint: Checkpoint) -> _Plan:
        sessions = split_sessions(config.sessions, data.labels, data.train)
        streams = session_streams(config.sessions, sessions, data.train)
        configs = {m.name: method_config(config.classifier, m) for m in config.methods}
        seen_by_stage, seen = [], set()
        for labs in sessions:
            seen |= set(labs)
            seen_by_stage.append(set(seen))
        cell_fp = {
            m.name: fingerprint(
                [
                    m.model_dump(mode="json"),
                    configs[m.name].model_dump(mode="json"),
                    config.method_k(m),
                    config.budget(m),
                    config.dataset.seed,
                    # Only when off, so that the cells of runs made before it stay valid.
                    *([] if config.score_llm_alone or m.kind != "inca" else ["unread at weight 0"]),
                ]
            )
            for m in config.methods
        }
        tests = [_restrict(data.test, s) for s in seen_by_stage]
        return cls(
            config, data, sessions, streams, seen_by_stage, tests, configs, cell_fp, checkpoint
        )

    def planned(self, m: Any, t: int) -> bool:
        last = len(self.sessions) - 1
        return bool(self.tests[t]) and (m.evaluate_at == "every_session" or t == last)

    def finished(self, m: Any, t: int) -> dict[str, Any] | None:
        return self.checkpoint.get(m.name, t + 1, self.cell_fp[m.name])

    def missing(self, t: int) -> bool:
        return any(self.planned(m, t) and self.finished(m, t) is None for m in self.config.methods)


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
    out_dir.mkdir(parents=True, exist_ok=True)
    stores = out_dir / STORES
    if fresh:
        shutil.rmtree(stores, ignore_errors=True)
    run_fp = _run_fingerprint(config, data)
    plan = _Plan.make(config, data, Checkpoint(out_dir, run_fp, fresh=fresh))
    sizes = (data.name, len(data.train), len(data.test), len(plan.sessions))
    logger.info("%s: %d train, %d test, %d sessions", *sizes)
    cached = CachedEmbedder(
        embedder or load_embedder(config.classifier.embedder), out_dir / EMBEDDINGS
    )
    embed_seconds = _embed_all(cached, data, tick)
    clf, learned = _open_incremental(plan, stores / "incremental", cached)
    pool = BackendPool(out_dir, backend_factory)
    try:
        reused = _run_sessions(plan, clf, pool, learned, cached, tick)
        learn_seconds = sum(s.seconds for s in clf.memory.sessions())
        llm_usage = pool.usage()
    finally:
        clf.close()
        pool.close()
    joint = _joint(plan, run_fp, stores, cached) if config.joint_check else None
    return {
        "name": config.name,
        "config": config.model_dump(mode="json"),
        "dataset": _dataset_summary(data),
        "sessions": plan.sessions,
        "headline": headline(data.multi_label),
        "embed_seconds": embed_seconds,
        "embedded_texts": cached.misses,
        "learn_seconds_excluding_embedding": learn_seconds,
        "resumed": {"sessions_already_learned": learned, "cells_reused": reused},
        "llm_usage": llm_usage,
        "methods": _methods(plan, joint),
    }


def _dataset_summary(data: Dataset) -> dict[str, Any]:
    return {
        "name": data.name,
        "train": len(data.train),
        "test": len(data.test),
        "labels": len(data.labels),
        "multi_label": data.multi_label,
    }


def _embed_all(cached: CachedEmbedder, data: Dataset, tick: Progress) -> float:
    """Embed every text of the run (what the cache misses); returns the seconds it took."""
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
    return time.perf_counter() - start


def _open_incremental(
    plan: _Plan, store_path: Path, embedder: CachedEmbedder
) -> tuple[ContinualClassifier, int]:
    """The run's learned store and how many sessions it holds; emptied when a missing cell of
    an earlier stage needs the store as it was then (learned again from the start, embeddings
    and LLM calls coming from the caches)."""
    classifier_config = plan.config.classifier
    clf = ContinualClassifier.open(store_path, classifier_config, embedder=embedder)
    learned = len(clf.memory.sessions())
    expected = sum(len(s) for s in plan.streams[:learned])
    first_missing = next((t for t in range(len(plan.sessions)) if plan.missing(t)), None)
    if learned and (
        learned > len(plan.sessions)
        or clf.memory.n_examples != expected
        or (first_missing is not None and first_missing < learned - 1)
    ):
        logger.warning("%s: relearning the sessions from the start", store_path)
        clf.close()
        shutil.rmtree(store_path)
        clf = ContinualClassifier.open(store_path, classifier_config, embedder=embedder)
        learned = 0
    return clf, learned


def _run_sessions(
    plan: _Plan,
    clf: ContinualClassifier,
    pool: BackendPool,
    learned: int,
    embedder: CachedEmbedder,
    tick: Progress,
) -> int:
    """Learn the sessions the store lacks and evaluate every unfinished cell after each;
    returns how many finished cells were reused."""
    config, multi = plan.config, plan.data.multi_label
    label_by_name = {lab.label: lab for lab in plan.data.labels}
    total_cells = sum(plan.planned(m, t) for m in config.methods for t in range(len(plan.sessions)))
    cells_done = reused = n_examples = cardinality_sum = 0
    shown: Counter[str] = Counter()
    for t, labs in enumerate(plan.sessions):
        if t >= learned:
            # Each method fits the heads it uses (run_method), for its own k and scorer.
            known = [label_by_name[lab] for lab in labs if lab in label_by_name]
            clf.learn(plan.streams[t], known, fit=False)
        n_examples += len(plan.streams[t])
        cardinality_sum += sum(len(ex.labels) for ex in plan.streams[t])
        shown.update(lab for ex in plan.streams[t] for lab in ex.labels)
        train = TrainCounts(dict(shown), len(plan.data.train))
        ctx = StageContext(clf, pool, multi, cardinality_sum / max(n_examples, 1), config.k)
        for m in config.methods:
            if not plan.planned(m, t):
                continue
            if plan.finished(m, t) is not None:
                reused += 1
            else:
                result = _evaluate_cell(
                    config,
                    m,
                    plan.configs[m.name],
                    ctx,
                    plan.tests[t],
                    plan.sessions[: t + 1],
                    multi,
                    t,
                    tick,
                    train,
                )
                plan.checkpoint.put(m.name, t + 1, plan.cell_fp[m.name], result)
            cells_done += 1
            tick("cells", cells_done, total_cells)
        tick("sessions", t + 1, len(plan.sessions))
    return reused


def _joint(plan: _Plan, run_fp: str, stores: Path, embedder: CachedEmbedder) -> dict[str, float]:
    """The joint check (see :func:`_joint_check`), kept in the checkpoint."""
    config = plan.config
    joint_fp = fingerprint(
        [
            run_fp,
            [(m.name, getattr(m, "scorer", None), config.method_k(m)) for m in config.methods],
            # The scorers' settings (e.g. prototype calibration) change what is compared.
            config.classifier.memory.model_dump(mode="json"),
        ]
    )
    joint = plan.checkpoint.get_extra("joint", joint_fp)
    if joint is None:
        joint = _joint_check(config, plan.streams, plan.data, stores, embedder)
        plan.checkpoint.put_extra("joint", joint_fp, joint)
    return joint


def _methods(plan: _Plan, joint: dict[str, float] | None) -> dict[str, dict[str, Any]]:
    """Each method's stages, accuracy matrix and summary."""
    methods: dict[str, dict[str, Any]] = {}
    n = len(plan.sessions)
    for m in plan.config.methods:
        cells = {t: plan.finished(m, t) for t in range(n) if plan.planned(m, t)}
        methods[m.name] = _summarise(
            m, cells, plan.tests, plan.seen_by_stage, n, plan.data.multi_label, joint
        )
    return methods


def _evaluate_cell(
    config: EvalConfig,
    method: Any,
    method_cfg: ClassifierConfig,
    ctx: StageContext,
    test: list[Example],
    sessions: Sequence[Sequence[str]],
    multi: bool,
    t: int,
    tick: Progress,
    train: TrainCounts,
) -> dict[str, Any]:
    # The same seeded sample at a stage for every method with the same budget: comparable cells.
    items = sample_items(test, config.budget(method), config.dataset.seed + t)
    # Through the stage's classifier: its embedder applies the store's frozen transform (the
    # centring of an LLM view), as `predict` does; the run's cache stays underneath it.
    queries = ctx.classifier.embedder.encode([ex.item for ex in items])
    k = config.method_k(method)
    bar = f"{method.name} after session {t + 1}"
    done = 0

    def items_done(n: int) -> None:
        nonlocal done
        done += n
        if method.kind in LLM_KINDS:
            tick(bar, done, len(items))

    def fitting(stage: str, done: int, total: int) -> None:
        tick(f"{method.name} {stage}", done, total)

    stage_ctx = StageContext(
        ctx.classifier,
        ctx.pool,
        ctx.multi_label,
        ctx.mean_cardinality,
        k,
        items_done,
        config.confidence,
        fitting if method.kind in LLM_KINDS else None,
        config.score_llm_alone,
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
        few_shot=config.sessions.shots is not None,
        train=train,
    )


def _same_ranking(a: list[tuple[str, float]], b: list[tuple[str, float]]) -> bool:
    """The same candidates with the same scores, up to the order of labels whose scores tie
    (ties break by label column, and two stores number labels in the order they met them)."""
    if len(a) != len(b) or not np.allclose([s for _, s in a], [s for _, s in b], rtol=1e-4):
        return False
    groups: dict[float, tuple[set[str], set[str]]] = {}
    for (x, score), (y, _) in zip(a, b, strict=True):
        key = round(score, 4)
        groups.setdefault(key, (set(), set()))
        groups[key][0].add(x)
        groups[key][1].add(y)
    last = round(a[-1][1], 4) if a else None  # the cut may fall inside the lowest tie
    return all(left == right for key, (left, right) in groups.items() if key != last)


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
        joint.learn([ex for stream in streams for ex in stream], data.labels, fit=False)
        # Each store's own embedder: an LLM view's centring is fitted on each store's first session.
        items = [ex.item for ex in data.test]
        joint_queries, queries = joint.embedder.encode(items), incremental.embedder.encode(items)
        agreement = {}
        for m in config.methods:
            if not hasattr(m, "scorer"):
                continue
            k = config.method_k(m)
            if m.scorer in ("auto", "ranpac", "klda"):
                # Their scorer and strengths are chosen on held-out stored items, the incremental
                # store's when it had grown enough since its last choice: both are chosen again
                # on the final store, and compared at the same strengths.
                for store in (joint, incremental):
                    store.fit(k, scorer=m.scorer, use_llm=False, full=True)
            a = joint.candidates(joint_queries, k, scorer=m.scorer)
            b = incremental.candidates(queries, k, scorer=m.scorer)
            same = [_same_ranking(x, y) for x, y in zip(a, b, strict=True)]
            agreement[m.name] = float(np.mean(same))
    finally:
        joint.close()
        incremental.close()
    return agreement
