"""What it costs to forget a fraction of a full store, through the public API.

1. A store learns the whole train file (vectors from ``--vectors``, a ``.npy`` aligned with it:
   the base is not what is measured) and fits, as ``icl-cl learn`` does.
2. A freshly opened classifier forgets ``--fraction`` of the items, drawn at random with
   ``--seed`` (never a label's last example, which a forget refuses): ``forget_s`` is the edit
   alone (checks, statistics recomputed from the remaining rows, the vector file and database
   rewritten and committed, the database vacuumed, the memory reloaded); ``fit_s`` the fit that
   ``icl-cl forget`` runs after it (the ``auto`` choice and the heads made again: the derived
   feature state is rebuilt from the stored vectors there).
3. ``predict_s``: a freshly opened classifier predicting one input (what a reader pays after).
4. ``verify``: ``icl-cl verify``'s verdict on the edited store.

Usage:
    python eval/bench/forget.py --data DATASET_DIR --vectors train.npy [--fraction 0.01]
        [--limit N] [--out runs/bench/forget.json]
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

from icl_cl import ContinualClassifier
from icl_cl.config import EmbedderConfig
from icl_cl.embedding import load_embedder
from icl_cl.embedding.given import GivenVectors
from icl_cl.inputs import read_examples, read_labels
from icl_cl.memory.verify import verify_store
from icl_cl.types import Example


def draw(train: list[Example], fraction: float, seed: int) -> list[str]:
    """``fraction`` of the ids at random, never the last example of a label."""
    left: dict[str, int] = {}
    for ex in train:
        for lab in ex.labels:
            left[lab] = left.get(lab, 0) + 1
    rng = np.random.default_rng(seed)
    ids = []
    for i in rng.permutation(len(train))[: round(fraction * len(train))]:
        ex = train[int(i)]
        if all(left[lab] > 1 for lab in ex.labels):
            ids.append(ex.id)
            for lab in ex.labels:
                left[lab] -= 1
    return ids


def measure(args: argparse.Namespace) -> dict[str, Any]:
    data = Path(args.data)
    train, _ = read_examples(data / "train.jsonl", max_chars=100_000)
    labels = read_labels(data / "labels.jsonl")[0] if (data / "labels.jsonl").exists() else []
    vectors = np.load(args.vectors)
    if args.limit:
        train, vectors = train[: args.limit], vectors[: args.limit]
    embedder = GivenVectors(
        load_embedder(EmbedderConfig()), {ex.text: v for ex, v in zip(train, vectors, strict=True)}
    )
    work = Path(tempfile.mkdtemp(prefix="forget-bench-"))
    try:
        start = time.perf_counter()
        with ContinualClassifier.open(work / "store", embedder=embedder) as clf:
            clf.learn(train, labels)
        base_s = time.perf_counter() - start
        gone = draw(train, args.fraction, args.seed)
        start = time.perf_counter()
        with ContinualClassifier.open(work / "store", embedder=embedder) as clf:
            opened = time.perf_counter()
            report = clf.forget(gone, fit=False)
            forgotten = time.perf_counter()
            clf.fit()
            fitted = time.perf_counter()
        with ContinualClassifier.open(work / "store", embedder=embedder) as clf:
            clf.predict([train[0].text], k=10)
        predict_s = time.perf_counter() - fitted
        verdict = verify_store(work / "store")
        return {
            "train": len(train),
            "forgotten": report.examples_forgotten,
            "base_learn_and_fit_s": round(base_s, 2),
            "open_s": round(opened - start, 2),
            "forget_s": round(forgotten - opened, 2),
            "fit_s": round(fitted - forgotten, 2),
            "predict_s": round(predict_s, 2),
            "verify_ok": verdict.ok,
            "verify_s": round(verdict.seconds.get("total", 0.0), 2),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="dataset folder with train.jsonl")
    parser.add_argument("--vectors", required=True, help=".npy aligned with train.jsonl")
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="only the first N train items")
    parser.add_argument("--out", help="write the result as JSON here too")
    args = parser.parse_args()
    result = measure(args)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
