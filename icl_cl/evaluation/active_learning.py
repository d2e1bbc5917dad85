"""The active-learning protocol: learning curves (dev accuracy against labels used) of each
strategy of ``suggest`` and of random sampling, the ECL alone.

For each strategy, from the same seed store:

1. the seed: ``seed_per_label`` train examples of each label (a seeded draw), learned as the
   first session with every label's definition;
2. each round, a pool of ``pool`` inputs (at least ``pool_per_batch`` times the batch) is drawn
   at random from the train items not yet labelled, the strategy picks a batch from it
   (``ContinualClassifier.suggest``, or for the baselines the store's raw candidate scores),
   the gold labels are revealed, and the batch is learned as one session (``learn``, with its
   fit of the heads);
3. after the seed and after every round: top-1 accuracy on a seeded sample of ``dev`` test
   items, the label ``predict`` returns. With ``held_out: N`` the test items are ``N`` train
   items held out of the pool (one draw for every seed), so a run can be measured without dev.

Batches grow with the labels used (``growth`` of them, at least ``min_batch``), so the curve is
spaced evenly on a log scale. The reference is a store that learned all of train, with the same
config and the same dev sample; the headline is the labels a strategy needs to reach ``target``
(0.95) of its accuracy, linear between rounds, as a fraction of what random needs. A strategy
other than random stops ``rounds_past_target`` rounds after it reaches the target.

``combined@coverage_weight=2,mmr_lambda=0.7`` is ``combined`` with those ``SuggestOptions``.
Baselines besides ``random``: small-text's uncertainty strategies on the plain softmax of the
raw candidate scores, without the calibration the store fits: least confidence ``lc``,
prediction entropy ``plain-entropy``, breaking ties ``bt``.

A run folder holds ``embeddings/`` (vectors by text), ``checkpoint.json`` (the reference's
accuracy and each finished curve) and, while a curve runs, its stores under ``stores/``; a killed
run resumes at the first unfinished strategy.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from icl_cl.classifier import ContinualClassifier
from icl_cl.config import ClassifierConfig, ScorerName
from icl_cl.embedding import Embedder, load_embedder
from icl_cl.embedding.cache import CachedEmbedder
from icl_cl.embedding.given import GivenVectors
from icl_cl.errors import ConfigError
from icl_cl.evaluation.checkpoint import Checkpoint, fingerprint
from icl_cl.evaluation.datasets import DatasetSpec, load_dataset
from icl_cl.evaluation.protocol import EMBEDDINGS, STORES, limited, read_yaml
from icl_cl.inputs import read_examples
from icl_cl.labelling.suggest import STRATEGIES, SuggestOptions
from icl_cl.types import Example, Label, Progress

logger = logging.getLogger(__name__)

RANDOM = "random"
HELD_OUT_DRAW = 123
"""Seed of the draw of ``held_out`` train items (fixed: it is the run's test set)."""
BASELINES = ("lc", "plain-entropy", "bt")
"""small-text's uncertainty strategies, on the softmax of the raw candidate scores."""
VARIANT_OPTIONS = {"k": int, "shortlist": int, "confidence": float, "few": float}
VARIANT_OPTIONS.update(coverage_weight=float, mmr_lambda=float)
"""The ``SuggestOptions`` a strategy's name may set after ``@``."""


def parse_strategy(name: str) -> tuple[str, dict[str, float]]:
    """``combined@coverage_weight=2`` -> ``("combined", {"coverage_weight": 2.0})``; refuses a
    strategy or option that does not exist."""
    base, _, settings = name.partition("@")
    if base not in (*STRATEGIES, *BASELINES):
        known = ", ".join([*STRATEGIES, *BASELINES])
        raise ValueError(f"unknown strategy {base!r} (strategies: {known})")
    options: dict[str, float] = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if base not in STRATEGIES or key not in VARIANT_OPTIONS:
            raise ValueError(
                f"strategy {name!r}: {key!r} is not an option of it "
                f"(a suggest strategy takes {', '.join(VARIANT_OPTIONS)})"
            )
        try:
            options[key] = VARIANT_OPTIONS[key](value)
        except ValueError as exc:
            raise ValueError(f"strategy {name!r}: {key}={value!r} is not a number") from exc
    return base, options


class ActiveLearningConfig(BaseModel):
    """An active-learning run (``protocol: active_learning``): data, strategies, rounds."""

    model_config = ConfigDict(extra="forbid")
    name: str
    protocol: Literal["active_learning"]
    dataset: DatasetSpec
    classifier: ClassifierConfig = ClassifierConfig()
    scorer: ScorerName | Literal["auto"] | None = Field(
        None, description="the stores' ECL scorer (null: classifier.memory.scorer, auto)"
    )
    strategies: list[str] = Field(
        default_factory=lambda: [RANDOM, *BASELINES, *STRATEGIES[:-1]], min_length=1
    )
    seed_per_label: int = Field(2, gt=0, description="train examples of each label in the seed")
    pool: int = Field(3000, gt=0, description="unlabelled train items drawn each round")
    pool_per_batch: int = Field(4, gt=0, description="and at least this many times the batch")
    dev: int | None = Field(2000, gt=0, description="test items scored (seeded); null: all")
    max_labels: int = Field(8000, gt=0, description="labels used at the end of the last round")
    growth: float = Field(0.35, gt=0, description="a batch: this share of the labels used")
    min_batch: int = Field(45, gt=0, description="and at least this many")
    seed: int = 0
    repeats: int = Field(
        1,
        gt=0,
        description="runs with seeds seed, seed + 1, ...: each its own dev sample, seed "
        "labels and pools; the headline is of their mean labels to the target",
    )
    rounds_past_target: int | None = Field(
        1, ge=0, description="a strategy but random stops this many rounds after the target"
    )
    target: float = Field(0.95, gt=0, le=1, description="of the all-of-train accuracy")
    k: int = Field(10, gt=0, description="candidates per prediction")
    train_vectors: str | None = Field(None, description=".npy aligned with train.jsonl")
    dev_vectors: str | None = Field(None, description=".npy aligned with dataset.test_file")
    train_from_dev: bool = Field(
        False, description="the test items outside the dev sample are the train items"
    )
    held_out: int | None = Field(
        None,
        gt=0,
        description="score train items held out of the pool (this many, the same draw for "
        "every seed; dev samples them) instead of the test file: a run that never reads dev",
    )

    @model_validator(mode="after")
    def _strategies(self) -> ActiveLearningConfig:
        twice = sorted({s for s in self.strategies if self.strategies.count(s) > 1})
        if twice:
            raise ValueError(f"strategies must be unique; repeated: {twice}")
        if RANDOM not in self.strategies:
            raise ValueError("strategies must include 'random': the headline is relative to it")
        for name in self.strategies:
            parse_strategy(name)
        if self.held_out is not None and (self.train_from_dev or self.dev_vectors):
            raise ValueError(
                "held_out scores train items: it takes neither train_from_dev nor dev_vectors"
            )
        return self

    @classmethod
    def from_dict(cls, data: Any, source: str = "eval config") -> ActiveLearningConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: invalid active-learning config: {exc}") from exc

    @classmethod
    def from_yaml(cls, path: str | Path) -> ActiveLearningConfig:
        return cls.from_dict(read_yaml(path), source=str(path))

    def with_limits(self, max_train: int | None, max_test: int | None) -> ActiveLearningConfig:
        """A copy using at most ``max_train`` / ``max_test`` items (smoke runs)."""
        return self.model_copy(update={"dataset": limited(self.dataset, max_train, max_test)})

    def store_config(self) -> ClassifierConfig:
        """The stores' config: the classifier's, with the scorer."""
        if self.scorer is None:
            return self.classifier
        memory = self.classifier.memory.model_copy(update={"scorer": self.scorer})
        return self.classifier.model_copy(update={"memory": memory})


def schedule(start: int, max_labels: int, growth: float, min_batch: int) -> list[int]:
    """Batch sizes: each ``growth`` of the labels used so far, at least ``min_batch``."""
    sizes, used = [], start
    while used < max_labels:
        n = min(max(min_batch, round(growth * used)), max_labels - used)
        sizes.append(n)
        used += n
    return sizes


def seed_examples(train: Sequence[Example], per_label: int, seed: int) -> list[Example]:
    """``per_label`` examples of each label (of its first), a seeded draw."""
    rng = np.random.default_rng(seed)
    chosen, counts = [], {}
    for i in rng.permutation(len(train)):
        label = train[i].labels[0]
        if counts.get(label, 0) < per_label:
            counts[label] = counts.get(label, 0) + 1
            chosen.append(train[i])
    return chosen


def labels_to_reach(curve: Sequence[dict[str, Any]], target: float) -> float | None:
    """Labels at which the curve first reaches ``target`` (linear between rounds)."""
    for before, point in zip([None, *curve[:-1]], curve, strict=True):
        if point["accuracy"] >= target:
            if before is None:
                return float(point["labels"])
            a0, a1 = before["accuracy"], point["accuracy"]
            x0, x1 = before["labels"], point["labels"]
            return x0 + (target - a0) / (a1 - a0) * (x1 - x0)
    return None


def summary(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline of each curve: labels to the target, that as a fraction of random's, the
    last accuracy and the mean seconds of a round's pick."""
    target = result["target_fraction"] * result["full_accuracy"]
    random_needs = labels_to_reach(result["curves"].get(RANDOM, []), target)
    rows = []
    for strategy, curve in result["curves"].items():
        needs = labels_to_reach(curve, target)
        picks = [p.get("pick_s", 0.0) for p in curve[1:]]
        pick_s = float(np.mean(picks)) if picks else 0.0
        rows.append(_headline(strategy, needs, random_needs, curve[-1]["accuracy"], pick_s))
    return rows


def _headline(
    strategy: str, needs: float | None, random_needs: float | None, final: float, pick_s: float
) -> dict[str, Any]:
    """A row of the headline: labels to the target, against random's."""
    ratio = None if needs is None or random_needs is None else needs / random_needs
    return {
        "strategy": strategy,
        "labels_to_target": needs,
        "ratio_to_random": ratio,
        "final_accuracy": final,
        "pick_s_per_round": pick_s,
    }


def accuracy(clf: ContinualClassifier, dev: Sequence[Example], k: int) -> float:
    """Top-1 of the store's predictions (ECL alone) on ``dev``, queries through the store's
    embedder (its transform applies, as in ``predict``)."""
    preds = clf.predict_vectors(clf.embedder.encode([ex.item for ex in dev]), k=k)
    hits = [
        bool(p.labels) and p.labels[0] == ex.labels[0] for p, ex in zip(preds, dev, strict=True)
    ]
    return float(np.mean(hits))


def plain_uncertainty(
    clf: ContinualClassifier, vectors: np.ndarray, kind: str, k: int
) -> np.ndarray:
    """small-text's uncertainty on the softmax of the raw candidate scores (higher first)."""
    ranked = clf.candidates(vectors, k)
    out = np.zeros(len(ranked))
    for i, cands in enumerate(ranked):
        s = np.array([score for _, score in cands], np.float64)
        p = np.exp(s - s.max())
        p /= p.sum()
        if kind == "lc":
            out[i] = 1.0 - p[0]
        elif kind == "bt":
            out[i] = -(p[0] - (p[1] if len(p) > 1 else 0.0))
        else:
            q = p[p > 0]
            out[i] = float(-(q * np.log(q)).sum())
    return out


def suggest_options(strategy: str, seed: int) -> SuggestOptions:
    """The ``SuggestOptions`` a ``suggest`` strategy's name (variant included) picks with."""
    name, given = parse_strategy(strategy)
    return SuggestOptions(name, neighbours=0, seed=seed, **given)  # type: ignore[arg-type]


def pick(
    clf: ContinualClassifier, strategy: str, pool: list[Example], n: int, seed: int, k: int
) -> list[Example]:
    """The batch of ``n`` that ``strategy`` picks from ``pool``."""
    if strategy == RANDOM:  # suggest's random, without predicting the pool first
        return [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:n]]
    if strategy in BASELINES:
        vectors = clf.embedder.encode([ex.item for ex in pool])
        score = plain_uncertainty(clf, vectors, strategy, k)
        return [pool[i] for i in np.lexsort((np.arange(len(pool)), -score))[:n]]
    options = suggest_options(strategy, seed)
    found = clf.suggest([ex.item for ex in pool], n, ids=[ex.id for ex in pool], options=options)
    by_id = {ex.id: ex for ex in pool}
    return [by_id[s.id] for s in found]


@dataclass
class _Plan:
    """What a run works on: the train items (the pool's source), the dev sample, the seed,
    the batch sizes, and the embedder every store uses."""

    config: ActiveLearningConfig
    name: str
    train: list[Example]
    dev: list[Example]
    labels: list[Label]
    seed: list[Example]
    batches: list[int]
    embedder: Embedder
    stores: Path

    def open(self, path: Path) -> ContinualClassifier:
        return ContinualClassifier.open(path, self.config.store_config(), embedder=self.embedder)


def _folder(config: ActiveLearningConfig, base: Path | None) -> Path:
    if config.dataset.path is None:
        raise ConfigError("train_vectors and dev_vectors need a dataset path (JSONL files)")
    folder = Path(config.dataset.path)
    return folder if base is None or folder.is_absolute() else base / folder


def _given_vectors(config: ActiveLearningConfig, base: Path | None) -> dict[str, np.ndarray]:
    """Known vectors by text, from the ``.npy`` files aligned with the dataset's files."""
    given: dict[str, np.ndarray] = {}
    for path, file in ((config.train_vectors, "train.jsonl"), (config.dev_vectors, None)):
        if path is None:
            continue
        folder = _folder(config, base)
        found = Path(path) if base is None or Path(path).is_absolute() else base / path
        examples, _ = read_examples(folder / (file or config.dataset.test_file), max_chars=10**6)
        try:
            vectors = np.load(found)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read vectors {found}: {exc}") from exc
        if len(vectors) != len(examples):
            raise ConfigError(f"{found}: {len(vectors)} vectors for {len(examples)} items")
        given.update((ex.text, np.asarray(v)) for ex, v in zip(examples, vectors, strict=True))
    return given


def _plan(
    config: ActiveLearningConfig, base: Path | None, embedder: Embedder, out_dir: Path
) -> _Plan:
    """The run's data: the train items, the seeded dev sample, the seed and the batches."""
    data = load_dataset(config.dataset, base)
    if data.multi_label:
        raise ConfigError("the active-learning protocol is for single-label datasets")
    test, train = data.test, data.train
    if config.held_out is not None:
        if config.held_out >= len(data.train):
            raise ConfigError(
                f"held_out {config.held_out} leaves no train item of {len(data.train)} to learn"
            )
        # One draw for every seed: the seeds differ in their sample of it, as of a test file.
        order = np.random.default_rng(HELD_OUT_DRAW).permutation(len(data.train))
        test = [data.train[i] for i in np.sort(order[: config.held_out])]
        train = [data.train[i] for i in np.sort(order[config.held_out :])]
    keep = np.random.default_rng(config.seed).permutation(len(test))[: config.dev]
    keep = np.sort(keep)
    if config.train_from_dev:  # the test items left out of the sample are the train items
        train = [test[i] for i in np.setdiff1d(np.arange(len(test)), keep)]
    seed = seed_examples(train, config.seed_per_label, config.seed)
    batches = schedule(
        len(seed), min(config.max_labels, len(train)), config.growth, config.min_batch
    )
    dev = [test[i] for i in keep]
    stores = out_dir / STORES
    return _Plan(config, data.name, train, dev, data.labels, seed, batches, embedder, stores)


def _curve(
    plan: _Plan, strategy: str, seed_store: Path, target: float, tick: Progress
) -> list[dict[str, Any]]:
    """One learning curve: ``[{labels, accuracy, pick_s, learn_s}]`` after the seed and after
    each round (the first point has no pick nor learn); ``target``: the accuracy to reach."""
    config, store = plan.config, plan.stores / "curve"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(seed_store, store)
    used = {ex.id for ex in plan.seed}
    with plan.open(store) as clf:
        curve = [{"labels": len(used), "accuracy": accuracy(clf, plan.dev, config.k)}]
        for r, n in enumerate(plan.batches):
            past = sum(p["accuracy"] >= target for p in curve)
            limit = config.rounds_past_target
            if strategy != RANDOM and limit is not None and past > limit:
                # The labels to the target are known; random runs on to compare.
                tick(f"{strategy}: rounds", len(plan.batches), len(plan.batches))
                break
            pool = _pool(plan, used, n, r)
            start = time.perf_counter()
            batch = pick(clf, strategy, pool, n, config.seed + r, config.k)
            picked = time.perf_counter()
            clf.learn(batch, k=config.k)
            learned = time.perf_counter()
            used.update(ex.id for ex in batch)
            point = {
                "labels": len(used),
                "accuracy": accuracy(clf, plan.dev, config.k),
                "pick_s": round(picked - start, 2),
                "learn_s": round(learned - picked, 2),
            }
            logger.info("%s: %d labels, dev top-1 %.4f", strategy, len(used), point["accuracy"])
            curve.append(point)
            tick(f"{strategy}: rounds", r + 1, len(plan.batches))
    shutil.rmtree(store, ignore_errors=True)
    return curve


def _pool(plan: _Plan, used: set[str], n: int, r: int) -> list[Example]:
    """Round ``r``'s pool: ``pool`` (at least ``pool_per_batch`` times the batch ``n``) train
    items not yet labelled, drawn at random, in their train order."""
    config = plan.config
    rng = np.random.default_rng([config.seed, r])
    remaining = [i for i, ex in enumerate(plan.train) if ex.id not in used]
    size = min(max(config.pool, config.pool_per_batch * n), len(remaining))
    draw = rng.choice(len(remaining), size, replace=False)
    return [plan.train[remaining[j]] for j in np.sort(draw)]


def run_active_learning(
    config: ActiveLearningConfig,
    out_dir: Path,
    base: Path | None = None,
    progress: Progress | None = None,
    *,
    embedder: Embedder | None = None,
    fresh: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the active-learning protocol; returns every number (``results.json``).

    Args:
        config: The protocol.
        out_dir: Run folder; the reference and the curves finished there are reused.
        base: Folder that relative dataset and vector paths are resolved against.
        progress: Progress callback.
        embedder: Sentence encoder to use instead of loading the configured one.
        fresh: Forget the finished reference and curves first (the embeddings are kept).
    """
    tick: Progress = progress or (lambda stage, done, total: None)
    out_dir.mkdir(parents=True, exist_ok=True)
    cached = CachedEmbedder(
        embedder or load_embedder(config.classifier.embedder), out_dir / EMBEDDINGS
    )
    given = _given_vectors(config, base)
    vectors = GivenVectors(cached, given) if given else cached
    plans = [
        _plan(config.model_copy(update={"seed": config.seed + r}), base, vectors, out_dir)
        for r in range(config.repeats)
    ]
    shutil.rmtree(plans[0].stores, ignore_errors=True)  # a killed run's: its curve starts again
    checkpoint = Checkpoint(out_dir, _run_fingerprint(config, plans[0]), fresh=fresh)
    runs, embed_seconds = [], 0.0
    for repeat, plan in enumerate(plans):
        embed_seconds += _embed_all(plan, cached, given, tick)
        runs.append(_seed_run(plan, checkpoint, repeat, tick))
    result = {
        "name": config.name,
        "protocol": "active_learning",
        "config": config.model_dump(mode="json"),
        "dataset": {
            "name": plan.name,
            "train": len(plan.train),
            "dev": len(plan.dev),
            "labels": len(plan.labels),
        },
        "seed_labels": len(plan.seed),
        "batches": plan.batches,
        "baselines": [s for s in config.strategies if s in (RANDOM, *BASELINES)],
        "embed_seconds": embed_seconds,
        "embedded_texts": cached.misses,
    }
    if len(runs) == 1:
        return {**result, **{k: v for k, v in runs[0].items() if k not in ("seed", "dev")}}
    return {**result, **_over_seeds(runs), "runs": runs}


def _seed_run(plan: _Plan, checkpoint: Checkpoint, repeat: int, tick: Progress) -> dict[str, Any]:
    """One seed's reference, curves and headline."""
    config = plan.config
    full, full_reused = _reference(plan, checkpoint, repeat)
    curves, reused = _curves(plan, checkpoint, config.target * full["accuracy"], tick, repeat)
    run = {
        "seed": config.seed,
        "dev": len(plan.dev),
        "full_accuracy": full["accuracy"],
        "full_seconds": full["seconds"],
        "target_fraction": config.target,
        "target": config.target * full["accuracy"],
        "curves": curves,
        "resumed": {"reference": full_reused, "strategies": reused},
    }
    return {**run, "summary": summary(run)}


def _over_seeds(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the repeats of a run give together: the mean curve of each strategy (over the
    rounds every seed ran), the mean reference and target, and the headline, each
    strategy's mean labels to the target against random's (with each seed's ratio)."""
    curves = {}
    for strategy in runs[0]["curves"]:
        per_seed = [run["curves"][strategy] for run in runs]
        curves[strategy] = [
            {
                "labels": points[0]["labels"],
                "accuracy": float(np.mean([p["accuracy"] for p in points])),
            }
            for points in zip(*per_seed, strict=False)
        ]
    rows = []
    by_strategy = [{row["strategy"]: row for row in run["summary"]} for run in runs]
    for strategy in runs[0]["curves"]:
        needs = [table[strategy]["labels_to_target"] for table in by_strategy]
        random_needs = [table[RANDOM]["labels_to_target"] for table in by_strategy]
        mean = None if None in needs else float(np.mean(needs))
        random_mean = None if None in random_needs else float(np.mean(random_needs))
        final, pick_s = (
            float(np.mean([table[strategy][key] for table in by_strategy]))
            for key in ("final_accuracy", "pick_s_per_round")
        )
        row = _headline(strategy, mean, random_mean, final, pick_s)
        row["ratios"] = [table[strategy]["ratio_to_random"] for table in by_strategy]
        rows.append(row)
    full = float(np.mean([run["full_accuracy"] for run in runs]))
    target_fraction = runs[0]["target_fraction"]
    return {
        "seeds": [run["seed"] for run in runs],
        "full_accuracy": full,
        "full_seconds": round(float(np.sum([run["full_seconds"] for run in runs])), 1),
        "target_fraction": target_fraction,
        "target": target_fraction * full,
        "curves": curves,
        "resumed": {
            "reference": all(run["resumed"]["reference"] for run in runs),
            "strategies": [
                s for s in runs[0]["curves"] if all(s in r["resumed"]["strategies"] for r in runs)
            ],
        },
        "summary": rows,
    }


def _run_fingerprint(config: ActiveLearningConfig, plan: _Plan) -> str:
    """What the run folder is about: a folder made for another dataset or embedder is refused."""
    return fingerprint(
        {
            "protocol": "active_learning",
            "dataset": config.dataset.model_dump(mode="json"),
            "name": plan.name,
            "embedder": config.classifier.embedder.model_dump(mode="json"),
        }
    )


def _embed_all(
    plan: _Plan, cached: CachedEmbedder, given: dict[str, np.ndarray], tick: Progress
) -> float:
    """Embed every text of the run that neither ``given`` nor the cache holds; returns the
    seconds it took."""
    items = [ex.item for ex in (*plan.train, *plan.dev)] + [lab.text for lab in plan.labels]
    items = [x for x in dict.fromkeys(items) if not isinstance(x, str) or x not in given]
    todo, done = cached.missing(items), 0

    def embedded(n: int) -> None:
        nonlocal done
        done += n
        tick("embedding", done, todo)

    start = time.perf_counter()
    cached.encode(items, progress=embedded)
    return time.perf_counter() - start


def _held_out_setting(config: ActiveLearningConfig) -> set[str]:
    """``{"held_out"}`` when set: a fingerprint includes it only then, so the run folders made
    before it existed keep their reference and curves."""
    return set() if config.held_out is None else {"held_out"}


def _reference(plan: _Plan, checkpoint: Checkpoint, repeat: int) -> tuple[dict[str, float], bool]:
    """``{accuracy, seconds}`` of a store that learned all of train (and whether the
    checkpoint had it)."""
    config = plan.config
    # What the reference depends on: the strategies, seed and rounds do not change it.
    data = {"dataset", "dev", "seed", "k", "train_from_dev", "train_vectors", "dev_vectors"}
    fp = fingerprint(
        [
            config.model_dump(mode="json", include=data | _held_out_setting(config)),
            config.store_config().model_dump(mode="json"),
        ]
    )
    key = "reference" if repeat == 0 else f"reference-{repeat}"
    found = checkpoint.get_extra(key, fp)
    if found is not None:
        return found, True
    path, start = plan.stores / "reference", time.perf_counter()
    with plan.open(path) as clf:
        clf.learn(plan.train, plan.labels, k=config.k)
        value = {"accuracy": accuracy(clf, plan.dev, config.k)}
    shutil.rmtree(path)
    value["seconds"] = round(time.perf_counter() - start, 1)
    logger.info("all of train: dev top-1 %.4f", value["accuracy"])
    checkpoint.put_extra(key, fp, value)
    return value, False


def _option_values(strategy: str) -> list[dict[str, Any]]:
    """What a ``suggest`` strategy's curve depends on besides its name: every option it picks
    with, defaults included, so a curve made under other defaults is redone (none for random
    and the baselines, which take no options)."""
    if strategy == RANDOM or strategy in BASELINES:
        return []
    values = asdict(suggest_options(strategy, 0))
    del values["seed"]  # each round's own
    return [values]


def _curves(
    plan: _Plan, checkpoint: Checkpoint, target: float, tick: Progress, repeat: int
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Every strategy's curve, and the strategies whose curve the checkpoint had. A curve
    depends on every setting but the run's name, the other strategies and the repeats, and on
    its strategy's options."""
    config = plan.config
    unused = {"name", "strategies", "repeats", "held_out"} - _held_out_setting(config)
    settings = config.model_dump(mode="json", exclude=unused)
    curves: dict[str, list[dict[str, Any]]] = {}
    reused: list[str] = []
    seed_store: Path | None = None
    for i, strategy in enumerate(config.strategies):
        fp = fingerprint([settings, strategy, *_option_values(strategy)])
        found = checkpoint.get(strategy, repeat, fp)
        if found is not None:
            curves[strategy] = found["curve"]
            reused.append(strategy)
        else:
            if seed_store is None:  # only when a curve is to run: a finished run learns nothing
                seed_store = plan.stores / "seed"
                with plan.open(seed_store) as clf:
                    clf.learn(plan.seed, plan.labels, k=config.k)
            curves[strategy] = _curve(plan, strategy, seed_store, target, tick)
            checkpoint.put(strategy, repeat, fp, {"curve": curves[strategy]})
        tick("strategies", i + 1, len(config.strategies))
    shutil.rmtree(plan.stores, ignore_errors=True)
    return curves, reused
