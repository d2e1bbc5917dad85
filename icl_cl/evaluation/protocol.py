"""The class-incremental protocol: learn sessions one by one, test on all labels seen so far."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from icl_cl import metrics
from icl_cl.config import ClassifierConfig, ScorerName
from icl_cl.embedding import load_embedder
from icl_cl.embedding.cache import CachedEmbedder
from icl_cl.errors import ConfigError
from icl_cl.evaluation.datasets import Dataset, DatasetSpec, load_dataset
from icl_cl.evaluation.sessions import SessionSpec, session_examples, split_sessions
from icl_cl.pipelines.continual import ContinualClassifier
from icl_cl.types import Example, Prediction

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``; the CLI draws bars from it."""


class MethodSpec(BaseModel):
    """One method in the comparison. ``ecl``: the external continual learner alone."""

    model_config = ConfigDict(extra="forbid")
    name: str
    kind: Literal["ecl"] = "ecl"
    scorer: ScorerName | Literal["auto"] = "auto"


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

    @classmethod
    def from_yaml(cls, path: str | Path) -> EvalConfig:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            return cls.model_validate(data)
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read eval config: {exc}") from exc
        except ValidationError as exc:
            raise ConfigError(f"{path}: invalid eval config: {exc}") from exc


def _restrict(test: Sequence[Example], labels: set[str]) -> list[Example]:
    """Test items that have a gold label in ``labels``, with gold restricted to them."""
    out = []
    for ex in test:
        gold = [lab for lab in ex.labels if lab in labels]
        if gold:
            out.append(Example(ex.id, ex.text, gold))
    return out


def score_predictions(
    gold: Sequence[Example],
    preds: Sequence[Prediction],
    multi_label: bool,
    k: int,
    full_scores: np.ndarray | None = None,
    label_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Quality metrics of one method on one test set."""
    gold_sets = [set(ex.labels) for ex in gold]
    rankings = [[c.label for c in p.candidates] for p in preds]
    if not multi_label:
        return {
            "accuracy": metrics.accuracy(
                [ex.labels[0] for ex in gold], [p.labels[0] for p in preds]
            ),
            f"recall@{k}": metrics.top_k_accuracy([ex.labels[0] for ex in gold], rankings, k),
        }
    out = {
        "rp@5": metrics.rank_precision_at_k(gold_sets, rankings, 5),
        "rp@10": metrics.rank_precision_at_k(gold_sets, rankings, 10),
        "p@5": metrics.precision_at_k(gold_sets, rankings, 5),
        "micro_f1": metrics.micro_f1(gold_sets, [set(p.labels) for p in preds]),
        "macro_f1": metrics.macro_f1(
            gold_sets, [set(p.labels) for p in preds], labels=sorted(set().union(*gold_sets))
        ),
        f"recall@{k}": metrics.recall_at_k(gold_sets, rankings, k),
    }
    if full_scores is not None and label_names is not None:
        finite = np.where(np.isfinite(full_scores), full_scores, -1e30)
        score_dicts = [dict(zip(label_names, row.tolist(), strict=True)) for row in finite]
        seen = sorted(set().union(*gold_sets))
        out["map"] = metrics.mean_average_precision(gold_sets, score_dicts, seen)
    return out


def _headline(multi_label: bool) -> str:
    return "rp@5" if multi_label else "accuracy"


def run_protocol(
    config: EvalConfig, out_dir: Path, base: Path | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """Run the class-incremental protocol and return every number (also for ``results.json``)."""
    data: Dataset = load_dataset(config.dataset, base)
    multi = data.multi_label
    sessions = split_sessions(config.sessions, data.labels, data.train)
    label_by_name = {lab.label: lab for lab in data.labels}
    streams = [session_examples(data.train, labs, t + 1) for t, labs in enumerate(sessions)]
    logger.info(
        "%s: %d train, %d test, %d sessions",
        data.name,
        len(data.train),
        len(data.test),
        len(sessions),
    )

    embedder = CachedEmbedder(load_embedder(config.classifier.embedder))
    texts = list(dict.fromkeys([ex.text for ex in data.train] + [ex.text for ex in data.test]))
    start = time.perf_counter()
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress("embedding", done, len(texts))

    embedder.encode(texts, progress=tick)
    embed_seconds = time.perf_counter() - start

    stores = out_dir / "stores"
    shutil.rmtree(stores, ignore_errors=True)
    clf = ContinualClassifier.open(stores / "incremental", config.classifier, embedder=embedder)
    methods: dict[str, dict[str, Any]] = {
        m.name: {"spec": m.model_dump(), "stages": [], "R": np.full((len(sessions),) * 2, np.nan)}
        for m in config.methods
    }
    learn_seconds = 0.0
    seen: set[str] = set()
    for t, labs in enumerate(sessions):
        report = clf.learn(streams[t], [label_by_name[lab] for lab in labs if lab in label_by_name])
        learn_seconds += report.seconds
        seen |= set(labs)
        test_t = _restrict(data.test, seen)
        if not test_t:
            continue
        queries = embedder.encode([ex.text for ex in test_t])
        for m in config.methods:
            stage = _evaluate_stage(clf, m, test_t, queries, config.k, multi, sessions[: t + 1])
            methods[m.name]["stages"].append(
                {
                    "session": t + 1,
                    "n_test": len(test_t),
                    "labels_seen": len(seen),
                    **stage["metrics"],
                }
            )
            methods[m.name]["R"][t, : t + 1] = stage["per_session"]
        if progress:
            progress("sessions", t + 1, len(sessions))

    joint = (
        _joint_check(config, streams, data, stores, embedder, multi) if config.joint_check else None
    )
    clf.close()
    for name, m in methods.items():
        stage_scores = [s[_headline(multi)] for s in m["stages"]]
        m["summary"] = {
            "average_incremental": metrics.average_incremental_accuracy(stage_scores),
            "last": metrics.last_accuracy(stage_scores),
            "forgetting": metrics.forgetting(m["R"]),
            "bwt": metrics.backward_transfer(m["R"]),
            **{key: m["stages"][-1][key] for key in m["stages"][-1] if key not in ("session",)},
        }
        if joint is not None:
            m["summary"]["joint_agreement"] = joint[name]
        m["R"] = [[None if np.isnan(v) else round(float(v), 6) for v in row] for row in m["R"]]
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
        "headline": _headline(multi),
        "embed_seconds": embed_seconds,
        "embedded_texts": embedder.misses,
        "learn_seconds_excluding_embedding": learn_seconds,
        "methods": methods,
    }


def _evaluate_stage(
    clf: ContinualClassifier,
    method: MethodSpec,
    test: list[Example],
    queries: np.ndarray,
    k: int,
    multi: bool,
    sessions: Sequence[Sequence[str]],
) -> dict[str, Any]:
    start = time.perf_counter()
    preds = clf.predict_vectors(queries, k, scorer=method.scorer)
    seconds = time.perf_counter() - start
    full = clf.memory.score_matrix(queries, method.scorer) if multi else None
    quality = score_predictions(test, preds, multi, k, full, clf.memory.stats.labels)
    per_session = []
    for labs in sessions:
        idx = [i for i, ex in enumerate(test) if set(ex.labels) & set(labs)]
        if not idx:
            per_session.append(np.nan)
            continue
        sub_gold = _restrict([test[i] for i in idx], set(labs))
        sub_pred = [preds[i] for i in idx]
        per_session.append(score_predictions(sub_gold, sub_pred, multi, k)[_headline(multi)])
    cost = {
        "seconds_per_item": seconds / len(test),
        "prompt_tokens_per_item": 0.0,
        "completion_tokens_per_item": 0.0,
        "llm_calls_per_item": 0.0,
    }
    return {"metrics": {**quality, **cost}, "per_session": per_session}


def _joint_check(
    config: EvalConfig,
    streams: list[list[Example]],
    data: Dataset,
    stores: Path,
    embedder: CachedEmbedder,
    multi: bool,
) -> dict[str, float]:
    """Learn every session's stream at once; the share of test items whose ranked candidates
    match the incremental store's exactly (1.0 means no difference at all)."""
    joint = ContinualClassifier.open(stores / "joint", config.classifier, embedder=embedder)
    incremental = ContinualClassifier.open(
        stores / "incremental", config.classifier, embedder=embedder
    )
    joint.learn([ex for stream in streams for ex in stream], data.labels)
    queries = embedder.encode([ex.text for ex in data.test])
    agreement = {}
    for m in config.methods:
        a = joint.predict_vectors(queries, config.k, scorer=m.scorer)
        b = incremental.predict_vectors(queries, config.k, scorer=m.scorer)
        same = [
            [c.label for c in x.candidates] == [c.label for c in y.candidates]
            for x, y in zip(a, b, strict=True)
        ]
        agreement[m.name] = float(np.mean(same))
    joint.close()
    incremental.close()
    return agreement
