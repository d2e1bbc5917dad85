"""ECE with exact duplicates in the training set against the same set without them.

A store that holds several copies of a text calibrates its probabilities on held-out stored
examples; if a held-out item's copies stay in memory, it finds itself and the calibration learns
overconfidence. Held-out items are drawn with all their (normalised-text) duplicates, so the ECE
on dev should not move when duplicates are added.

    python eval/bench/duplicate_calibration.py \\
        --data /path/to/wordnet-supersenses --train 10000 --dev 3000 --cache runs/embed-cache

Two stores are learned with the ECL alone (no LLM) from the same ``--train`` examples drawn
with ``--seed``: one as they are, one with exact copies (new ids, same text and label) added
for a random ``--duplicates`` share of the final set (0.2: one row in five is a copy). Each is
fitted (``learn`` then ``fit``) and predicts ``--dev`` dev items; the report gives accuracy, the
ECE of the top probability (15 equal-width bins) and the mean top probability per store.
Vectors are cached in ``--cache``, so a rerun embeds nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from icl_cl import ContinualClassifier
from icl_cl.config import EmbedderConfig
from icl_cl.embedding import load_embedder
from icl_cl.embedding.cache import CachedEmbedder
from icl_cl.inputs import read_examples
from icl_cl.metrics import expected_calibration_error
from icl_cl.types import Example


def with_duplicates(train: list[Example], share: float, seed: int) -> list[Example]:
    """``train`` plus exact copies (new ids) of random items, the copies being ``share`` of all."""
    n_copies = round(len(train) * share / (1 - share))
    rng = random.Random(seed)
    copies = [
        Example(f"{ex.id}#copy{i}", ex.text, list(ex.labels))
        for i, ex in enumerate(rng.choices(train, k=n_copies))
    ]
    mixed = train + copies
    rng.shuffle(mixed)
    return mixed


def run_arm(
    name: str, train: list[Example], dev: list[Example], embedder: CachedEmbedder, k: int
) -> dict[str, float | int | str]:
    """Learn ``train`` into a fresh store, fit, predict ``dev``; accuracy and ECE."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with ContinualClassifier.open(Path(tmp) / "store", embedder=embedder) as clf:
            clf.learn(train, fit=True, k=k)
            preds = clf.predict([ex.text for ex in dev], k=k, use_llm=False)
        seconds = time.perf_counter() - start
    top = [max(p.scores.values(), default=0.0) for p in preds]
    correct = [
        bool(p.labels) and p.labels[0] in ex.labels for p, ex in zip(preds, dev, strict=True)
    ]
    return {
        "arm": name,
        "train_rows": len(train),
        "distinct_texts": len({ex.text for ex in train}),
        "accuracy": round(float(np.mean(correct)), 4),
        "ece": round(expected_calibration_error(top, correct), 4),
        "mean_top_probability": round(float(np.mean(top)), 4),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with train.jsonl and dev.jsonl")
    parser.add_argument("--train", type=int, default=10_000, help="training items drawn")
    parser.add_argument("--dev", type=int, default=3_000, help="dev items drawn")
    parser.add_argument("--duplicates", type=float, default=0.2, help="share of copies")
    parser.add_argument("--k", type=int, default=10, help="candidates per input")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", help="folder of cached vectors")
    args = parser.parse_args()

    data = Path(args.data)
    train, _ = read_examples(data / "train.jsonl", max_chars=100_000)
    dev, _ = read_examples(data / "dev.jsonl", max_chars=100_000)
    rng = random.Random(args.seed)
    train = rng.sample(train, min(args.train, len(train)))
    dev = rng.sample(dev, min(args.dev, len(dev)))
    embedder = CachedEmbedder(load_embedder(EmbedderConfig()), args.cache)
    embedder.encode([ex.text for ex in train + dev])  # once, shared by both arms
    rows = [
        run_arm("no duplicates", train, dev, embedder, args.k),
        run_arm(
            f"{args.duplicates:.0%} exact duplicates",
            with_duplicates(train, args.duplicates, args.seed),
            dev,
            embedder,
            args.k,
        ),
    ]
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"ece_difference": round(float(rows[1]["ece"]) - float(rows[0]["ece"]), 4)}))


if __name__ == "__main__":
    main()
