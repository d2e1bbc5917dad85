"""What the random feature scorers' width M buys: dev top-1 of ranpac and klda at each width,
next to what the width costs (the state's size on disk, the time to build it from the vectors).

The learner state of a feature space is an M x M inverse Gram (stored as its upper triangle in
float64) plus a width-M sum per label, and a session costs O(n M^2): the width is the knob
between accuracy and every cost of the store. Vectors come precomputed (``.npy`` aligned with
the train and dev files), so the bench measures the spaces alone.

Usage:
    python eval/bench/feature_width.py --data DATASET_DIR --train-vectors train.npy
        --dev-vectors dev.npy [--widths 1024,2048,4096,8192] [--rhos 0.001,0.01]
        [--out runs/bench/feature_width.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from icl_cl.config import MemoryConfig
from icl_cl.inputs import read_examples
from icl_cl.memory.feature_space import FeatureSpace
from icl_cl.memory.random_features import RandomFeatures
from icl_cl.memory.scorers import class_prototypes


def _accuracy(scores: np.ndarray, gold: list[int]) -> float:
    return float(np.mean(scores.argmax(axis=1) == np.asarray(gold)))


def _dev_scores(space: FeatureSpace, dev: np.ndarray, prototypes: np.ndarray | None) -> np.ndarray:
    head = space.head(prototypes)
    return np.vstack(
        [
            head.scores(space.features.transform(dev[lo : lo + 2048]))
            for lo in range(0, len(dev), 2048)
        ]
    )


def run_width(
    width: int, train: np.ndarray, labels: list[list[str]], dev: np.ndarray, gold: list[int],
    names: list[str], rhos: list[float],
) -> dict[str, object]:  # fmt: skip
    """ranpac at each relative strength and klda (shrinkage estimated) at one width."""
    row: dict[str, object] = {"width": width}
    config = MemoryConfig()
    spaces = {
        "ranpac": ("ridge", RandomFeatures("relu", train.shape[1], width, config.feature_seed)),
        "klda": ("lda", RandomFeatures("rff", train.shape[1], width, config.feature_seed)),
    }
    for name, (kind, features) in spaces.items():
        t = time.perf_counter()
        space = FeatureSpace.build(
            kind, features, labels=names, vectors=train, row_labels=labels,
            inputs=[None] * len(train), items=False,
            strength=lambda s, gram: s.ridge_strength(float(np.trace(gram)), rhos[0])
            if s.kind == "ridge" else s.lda_strength(gram, "auto"),
        )  # fmt: skip
        row[f"{name}_build_s"] = round(time.perf_counter() - t, 1)
        if name == "klda":
            scores = _dev_scores(space, dev, class_prototypes(space.stats, config))
            row["klda"] = _accuracy(scores, gold)
        else:
            values, vectors = space.eigen()
            for rho in rhos:
                strength = space.ridge_strength(float(values.sum()), rho)
                space.restrengthen(strength, eigen=(values, vectors))
                row[f"ranpac@{rho:g}"] = _accuracy(_dev_scores(space, dev, None), gold)
        size = space.solver.size
        row["state_mb_per_space"] = round(
            (size * (size + 1) / 2 + len(names) * width) * 8 / 2**20, 1
        )
        print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--train-vectors", required=True)
    parser.add_argument("--dev-vectors", required=True)
    parser.add_argument("--widths", default="1024,2048,4096,8192")
    parser.add_argument("--rhos", default="0.001,0.01")
    parser.add_argument("--out")
    args = parser.parse_args()
    data = Path(args.data)
    train_ex, _ = read_examples(data / "train.jsonl", max_chars=10**6)
    dev_ex, _ = read_examples(data / "dev.jsonl", max_chars=10**6)
    train, dev = np.load(args.train_vectors), np.load(args.dev_vectors)
    names = sorted({lab for ex in train_ex for lab in ex.labels})
    col = {n: i for i, n in enumerate(names)}
    keep = [i for i, ex in enumerate(dev_ex) if ex.labels[0] in col]
    gold = [col[dev_ex[i].labels[0]] for i in keep]
    rhos = [float(r) for r in args.rhos.split(",")]
    rows = [
        run_width(int(w), train, [list(ex.labels) for ex in train_ex], dev[keep], gold, names, rhos)
        for w in args.widths.split(",")
    ]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"data": str(data), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
