"""What it costs to forget a fraction of a full store, through the public API.

1. A store learns the whole train file (vectors from ``--vectors``, a ``.npy`` aligned with it:
   the base is not what is measured) and fits, as ``icl-cl learn`` does.
2. For each path of ``--paths``, a copy of that store, freshly opened, forgets ``--fraction`` of
   the items, drawn at random with ``--seed`` (never a label's last example, which a forget
   refuses): ``forget_s`` is the edit alone (checks, statistics recomputed from the remaining
   rows, the vector file and database rewritten and committed, the database vacuumed, the saved
   feature spaces edited, the memory reloaded); ``fit_s`` the fit that ``icl-cl forget`` runs
   after it (the ``auto`` choice and the heads made again).

   - ``carried``: what ``icl-cl forget`` does: the saved feature spaces are edited (the changed
     items' rows out of the Gram, one factorisation at the new strength) and kept.
   - ``rebuilt``: the earlier path, for comparison: the saved feature spaces are removed before
     the edit (so it carries none), and the fit rebuilds them from every stored vector.
3. ``predict_s``: a freshly opened classifier predicting one input (what a reader pays after).
4. ``verify``: ``icl-cl verify``'s verdict on the edited store.

Usage:
    python eval/bench/forget.py --data DATASET_DIR --vectors train.npy [--fraction 0.01]
        [--limit N] [--paths carried,rebuilt] [--base DIR] [--out runs/bench/forget.json]
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


def _edit_and_fit(
    store: Path, embedder: GivenVectors, gone: list[str], path: str, train: list[Example]
) -> dict[str, Any]:
    """One path (see the module) on ``store``, a copy of the learned store."""
    if path == "rebuilt":  # as the edit did before it carried them: nothing saved to edit
        for file in store.glob("features-*"):
            file.unlink()
    start = time.perf_counter()
    with ContinualClassifier.open(store, embedder=embedder) as clf:
        opened = time.perf_counter()
        report = clf.forget(gone, fit=False)
        forgotten = time.perf_counter()
        carried = sorted(f.name for f in store.glob("features-*.npz"))
        clf.fit()
        fitted = time.perf_counter()
        auto = clf.memory.choice.scorer if clf.memory.choice is not None else None
    with ContinualClassifier.open(store, embedder=embedder) as clf:
        clf.predict([train[0].text], k=10)
    predict_s = time.perf_counter() - fitted
    verdict = verify_store(store)
    return {
        "forgotten": report.examples_forgotten,
        "carried_spaces": carried,
        "open_s": round(opened - start, 2),
        "forget_s": round(forgotten - opened, 2),
        "fit_s": round(fitted - forgotten, 2),
        "auto_after": auto,
        "predict_s": round(predict_s, 2),
        "verify_ok": verdict.ok,
        "verify_s": round(verdict.seconds.get("total", 0.0), 2),
    }


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
    base = Path(args.base) if args.base else work / "store"
    try:
        start = time.perf_counter()
        with ContinualClassifier.open(base, embedder=embedder) as clf:
            if not clf.memory.n_examples:  # a kept base (--base) is learned once
                clf.learn(train, labels)
            auto = clf.memory.choice.scorer if clf.memory.choice is not None else None
        result: dict[str, Any] = {
            "train": len(train),
            "base_learn_and_fit_s": round(time.perf_counter() - start, 2),
            "auto_before": auto,
            "saved_spaces": sorted(f.name for f in base.glob("features-*.npz")),
        }
        gone = draw(train, args.fraction, args.seed)
        for path in args.paths.split(","):
            shutil.copytree(base, work / path)
            result[path] = _edit_and_fit(work / path, embedder, gone, path, train)
            shutil.rmtree(work / path, ignore_errors=True)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="dataset folder with train.jsonl")
    parser.add_argument("--vectors", required=True, help=".npy aligned with train.jsonl")
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, help="only the first N train items")
    parser.add_argument(
        "--paths", default="carried,rebuilt", help="carried, rebuilt or both (see the module)"
    )
    parser.add_argument(
        "--base", help="keep the learned store here, and use it if it is there already"
    )
    parser.add_argument("--out", help="write the result as JSON here too")
    args = parser.parse_args()
    result = measure(args)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
