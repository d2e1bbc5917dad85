"""Active learning with ``suggest``: learning curves (dev accuracy against labels used) of each
strategy and of random sampling, through the public API, the ECL alone.

Protocol, for each strategy, from the same seed store:

1. the seed: ``--seed-per-label`` train examples of each label (seeded draw), learned as the
   first session with every label's definition;
2. each round, a pool of ``--pool`` inputs (at least ``--pool-per-batch`` times the batch)
   is drawn at random from the train items not yet labelled, the strategy picks a batch from
   it (``ContinualClassifier.suggest``, or for the baselines below the store's candidate
   scores), the gold labels are revealed, and the batch is learned as one session (``learn``,
   with its fit of the heads);
3. after the seed and after every round: top-1 accuracy on a seeded sample of ``--dev`` dev
   items, the label ``predict`` returns.

Batches grow with the labels used (``--growth`` of them, at least ``--min-batch``), so the
curve is spaced evenly on a log scale. The reference is a store that learned all of train,
with the same config and the same dev sample; the headline is the labels a strategy needs to
reach 95% of its accuracy (linear between rounds), as a fraction of what random needs.
A strategy named ``combined@coverage_weight=2,mmr_lambda=0.7`` is ``combined`` with those
options of ``SuggestOptions``.

Baselines besides ``random``, small-text's uncertainty strategies (least confidence,
prediction entropy, breaking ties) on the plain softmax of the ECL's raw candidate scores,
without the calibration the store fits: ``lc``, ``plain-entropy``, ``bt``.

Without ``--train-vectors`` the protocol runs within the dev split: the dev items outside the
seeded sample of ``--dev`` are the train items (and the reference learns all of them).

The pool's vectors are embedded once beforehand (``--train-vectors``, ``--dev-vectors``:
``.npy`` aligned with the files): the embedder answers those texts from them and embeds the
rest (the label definitions).

Usage:
    python eval/bench/active_learning.py --data DATASET_DIR --train-vectors train.npy
        --dev-vectors dev.npy [--strategies random,bt,margin,combined,...] [--scorer S]
        [--seed-per-label 2] [--pool 3000] [--dev 2000] [--max-labels 8000]
        [--out runs/bench/active_learning.json] [--plot docs/images/active-learning.png]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl import ClassifierConfig, ContinualClassifier, MemoryConfig
from icl_cl.config import EmbedderConfig
from icl_cl.embedding import load_embedder
from icl_cl.embedding.given import GivenVectors
from icl_cl.inputs import read_examples, read_labels
from icl_cl.labelling.suggest import STRATEGIES
from icl_cl.types import Example

BASELINES = ("lc", "plain-entropy", "bt")
TARGET = 0.95


def accuracy(clf: ContinualClassifier, dev: list[Example], vectors: np.ndarray) -> float:
    """Top-1 of the store's predictions (ECL alone) on ``dev``."""
    preds = clf.predict_vectors(vectors, k=10)
    return float(np.mean([p.labels[0] == ex.labels[0] for p, ex in zip(preds, dev, strict=True)]))


def plain_uncertainty(clf: ContinualClassifier, vectors: np.ndarray, kind: str) -> np.ndarray:
    """small-text's uncertainty on the softmax of the raw candidate scores (higher first)."""
    ranked = clf.candidates(vectors, 10)
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


def pick(
    clf: ContinualClassifier,
    strategy: str,
    pool: list[Example],
    vectors: np.ndarray,
    n: int,
    seed: int,
) -> list[Example]:
    """The batch ``strategy`` picks from ``pool``."""
    if strategy == "random":  # suggest's random, without predicting the pool first
        return [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))[:n]]
    if strategy in BASELINES:
        score = plain_uncertainty(clf, vectors, strategy)
        return [pool[i] for i in np.lexsort((np.arange(len(pool)), -score))[:n]]
    from icl_cl.labelling.suggest import SuggestOptions

    # A variant names its options: combined@coverage_weight=2,mmr_lambda=0.7
    name, _, settings = strategy.partition("@")
    given = dict(kv.split("=") for kv in settings.split(",") if kv)
    options = SuggestOptions(
        name, neighbours=0, seed=seed, **{k: float(v) for k, v in given.items()}
    )
    found = clf.suggest([ex.text for ex in pool], n, ids=[ex.id for ex in pool], options=options)
    by_id = {ex.id: ex for ex in pool}
    return [by_id[s.id] for s in found]


def schedule(start: int, max_labels: int, growth: float, min_batch: int) -> list[int]:
    """Batch sizes: each ``growth`` of the labels used so far, at least ``min_batch``."""
    sizes, used = [], start
    while used < max_labels:
        n = min(max(min_batch, round(growth * used)), max_labels - used)
        sizes.append(n)
        used += n
    return sizes


def seed_examples(train: list[Example], per_label: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    chosen, counts = [], {}
    for i in rng.permutation(len(train)):
        label = train[i].labels[0]
        if counts.get(label, 0) < per_label:
            counts[label] = counts.get(label, 0) + 1
            chosen.append(train[i])
    return chosen


def run_strategy(
    strategy: str,
    seed_store: Path,
    work: Path,
    data: dict[str, Any],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """One learning curve: ``[{labels, accuracy, pick_s, learn_s}]`` after the seed and each
    round."""
    store = work / strategy
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(seed_store, store)
    train, index, embedder = data["train"], data["index"], data["embedder"]
    used = {ex.id for ex in data["seed"]}
    with ContinualClassifier.open(store, data["config"], embedder=embedder) as clf:
        curve = [{"labels": len(used), "accuracy": accuracy(clf, *data["dev"])}]
        print(json.dumps({"strategy": strategy, **curve[0]}), flush=True)
        for r, n in enumerate(data["schedule"]):
            past = [p for p in curve if p["accuracy"] >= data["target"]]
            if strategy != "random" and len(past) > args.rounds_past_target:
                break  # the labels to the target are known; random runs on to compare
            rng = np.random.default_rng([args.seed, r])
            remaining = [i for i, ex in enumerate(train) if ex.id not in used]
            size = min(max(args.pool, args.pool_per_batch * n), len(remaining))
            draw = rng.choice(len(remaining), size, replace=False)
            pool = [train[remaining[j]] for j in np.sort(draw)]
            vectors = data["train_vectors"][[index[ex.id] for ex in pool]]
            t = time.perf_counter()
            batch = pick(clf, strategy, pool, vectors, n, args.seed + r)
            pick_s = time.perf_counter() - t
            clf.learn(batch)
            used.update(ex.id for ex in batch)
            point = {
                "labels": len(used),
                "accuracy": accuracy(clf, *data["dev"]),
                "pick_s": round(pick_s, 2),
                "learn_s": round(time.perf_counter() - t - pick_s, 2),
            }
            print(json.dumps({"strategy": strategy, **point}), flush=True)
            curve.append(point)
    shutil.rmtree(store, ignore_errors=True)
    return curve


def labels_to_reach(curve: list[dict[str, Any]], target: float) -> float | None:
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
    target = TARGET * result["full_accuracy"]
    random_needs = labels_to_reach(result["curves"].get("random", []), target)
    rows = []
    for strategy, curve in result["curves"].items():
        needs = labels_to_reach(curve, target)
        ratio = needs / random_needs if needs is not None and random_needs else None
        rows.append(
            {
                "strategy": strategy,
                "labels_to_95": None if needs is None else round(needs),
                "ratio_to_random": None if ratio is None else round(ratio, 3),
                "final_accuracy": round(curve[-1]["accuracy"], 4),
                "pick_s_per_round": round(
                    float(np.mean([p.get("pick_s", 0.0) for p in curve[1:]])), 2
                ),
            }
        )
    return rows


def markdown(result: dict[str, Any]) -> str:
    """The learning curves (dev top-1 at each count of labels) and the headline, as tables."""
    curves = result["curves"]
    names = list(curves)
    counts = sorted({p["labels"] for c in curves.values() for p in c})
    lines = ["| labels | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for n in counts:
        cells = [
            next((f"{p['accuracy']:.3f}" for p in curves[s] if p["labels"] == n), "") for s in names
        ]
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    target = TARGET * result["full_accuracy"]
    lines += [
        "",
        f"All of train: {result['full_accuracy']:.4f}; 95% of it: {target:.4f}.",
        "",
        "| strategy | labels to 95% | / random's | last accuracy | pick s a round |",
        "|---|---|---|---|---|",
    ]
    for row in summary(result):
        needs = row["labels_to_95"]
        ratio = row["ratio_to_random"]
        lines.append(
            f"| {row['strategy']} | {'not reached' if needs is None else f'{needs:,}'} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | {row['final_accuracy']:.3f} | "
            f"{row['pick_s_per_round']} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    for strategy, curve in result["curves"].items():
        style = "--" if strategy in (*BASELINES, "random") else "-"
        xs = [p["labels"] for p in curve]
        ax.plot(xs, [p["accuracy"] for p in curve], style, marker=".", label=strategy)
    ax.axhline(TARGET * result["full_accuracy"], color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("labels used")
    ax.set_ylabel("dev top-1")
    ax.set_title(f"{result['dataset']}: 95% of all of train = grey line", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def load(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.data)
    dev_all, _ = read_examples(folder / "dev.jsonl", max_chars=10**6)
    labels, _ = read_labels(folder / "labels.jsonl")
    dev_vectors = np.load(args.dev_vectors)
    rng = np.random.default_rng(args.seed)
    keep = np.sort(rng.permutation(len(dev_all))[: args.dev])
    if args.train_vectors:
        train, _ = read_examples(folder / "train.jsonl", max_chars=10**6)
        train_vectors = np.load(args.train_vectors)
    else:  # no train vectors: the dev items left out of the sample are the train items
        rest = np.setdiff1d(np.arange(len(dev_all)), keep)
        train, train_vectors = [dev_all[i] for i in rest], dev_vectors[rest]
    given = {ex.text: train_vectors[i] for i, ex in enumerate(train)}
    seed = seed_examples(train, args.seed_per_label, args.seed)
    start = len(seed)
    return {
        "train": train,
        "labels": labels,
        "index": {ex.id: i for i, ex in enumerate(train)},
        "train_vectors": train_vectors,
        "dev": ([dev_all[i] for i in keep], dev_vectors[keep]),
        "embedder": GivenVectors(load_embedder(EmbedderConfig()), given),
        "config": ClassifierConfig(memory=MemoryConfig(scorer=args.scorer)),
        "seed": seed,
        "schedule": schedule(start, args.max_labels, args.growth, args.min_batch),
    }


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="dataset folder (train, dev, labels)")
    parser.add_argument("--train-vectors", help="without it: the protocol runs within dev")
    parser.add_argument("--dev-vectors", required=True)
    parser.add_argument("--strategies", default=",".join(["random", *BASELINES, *STRATEGIES[:-1]]))
    parser.add_argument("--scorer", default="mahalanobis", help="the stores' ECL scorer")
    parser.add_argument("--seed-per-label", type=int, default=2)
    parser.add_argument("--pool", type=int, default=3000, help="pool drawn each round")
    parser.add_argument(
        "--pool-per-batch", type=int, default=4, help="and at least this many times the batch"
    )
    parser.add_argument("--dev", type=int, default=2000, help="dev items scored")
    parser.add_argument("--max-labels", type=int, default=8000)
    parser.add_argument("--growth", type=float, default=0.35)
    parser.add_argument("--min-batch", type=int, default=45)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds-past-target",
        type=int,
        default=1,
        help="a strategy other than random stops this many rounds after reaching the target",
    )
    parser.add_argument("--out", default="runs/bench/active_learning.json")
    parser.add_argument("--plot")
    parser.add_argument("--work", help="folder for the stores (default: a temporary one)")
    parser.add_argument(
        "--report", action="store_true", help="only the tables and plot of the curves in --out"
    )
    return parser.parse_args()


def main() -> None:
    args = arguments()
    if args.report:
        result = json.loads(Path(args.out).read_text())
        print(markdown(result))
        if args.plot:
            plot(result, Path(args.plot))
        return
    data = load(args)
    out = Path(args.out)
    # What a curve depends on: a run resumes the curves of a file with the same.
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "plot", "work", "report")}
    result: dict[str, Any] = {"dataset": Path(args.data).name, "settings": settings}
    if out.exists():  # resume: finished curves of the same settings are kept
        old = json.loads(out.read_text())
        if {k: v for k, v in old["settings"].items() if k != "strategies"} == {
            k: v for k, v in settings.items() if k != "strategies"
        }:
            result = {**old, "settings": settings}
    result.setdefault("curves", {})
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        if "full_accuracy" not in result:
            t = time.perf_counter()
            with ContinualClassifier.open(
                work / "full", data["config"], embedder=data["embedder"]
            ) as clf:
                clf.learn(data["train"], data["labels"])
                result["full_accuracy"] = accuracy(clf, *data["dev"])
            result["full_s"] = round(time.perf_counter() - t, 1)
            shutil.rmtree(work / "full")
            print(json.dumps({"full_accuracy": result["full_accuracy"]}), flush=True)
        data["target"] = TARGET * result["full_accuracy"]
        seed_store = work / "seed"
        with ContinualClassifier.open(seed_store, data["config"], embedder=data["embedder"]) as clf:
            clf.learn(data["seed"], data["labels"])
        for strategy in args.strategies.split(","):
            if strategy in result["curves"]:
                continue
            result["curves"][strategy] = run_strategy(strategy, seed_store, work, data, args)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
    result["summary"] = summary(result)
    out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    if args.plot:
        plot(result, Path(args.plot))


if __name__ == "__main__":
    main()
