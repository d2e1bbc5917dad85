"""Cut the small sample datasets shipped in eval/data/ from the shared development corpora.

Usage: python eval/data/make_samples.py ../shared/datasets
The samples are committed; this script documents exactly how they were made.
"""

from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from pathlib import Path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def single_label(src: Path, dst: Path, labels: list[str], n_train: int, n_test: int) -> None:
    rng = random.Random(0)
    for split, n in (("train", n_train), ("dev", n_test)):
        by_label = defaultdict(list)
        for row in read(src / f"{split}.jsonl"):
            if row["labels"][0] in labels:
                by_label[row["labels"][0]].append(row)
        rows = [r for lab in labels for r in rng.sample(by_label[lab], n)]
        write(dst / ("train.jsonl" if split == "train" else "test.jsonl"), rows)
    write(dst / "labels.jsonl", [r for r in read(src / "labels.jsonl") if r["label"] in labels])


def multi_label(src: Path, dst: Path, groups: list[str], n_train: int, n_test: int) -> None:
    rng = random.Random(0)
    labels = [r for r in read(src / "labels.jsonl") if r["group"] in groups]
    keep = {r["label"] for r in labels}
    for split, n in (("train", n_train), ("dev", n_test)):
        rows = []
        for row in read(src / f"{split}.jsonl"):
            tags = [t for t in row["labels"] if t in keep]
            if tags:
                rows.append({**row, "text": row["text"][:600], "labels": tags})
        write(dst / ("train.jsonl" if split == "train" else "test.jsonl"), rng.sample(rows, n))
    write(dst / "labels.jsonl", labels)


if __name__ == "__main__":
    shared = Path(sys.argv[1])
    here = Path(__file__).parent
    single_label(
        shared / "wordnet-supersenses",
        here / "wordnet-sample",
        [
            "noun.animal",
            "noun.plant",
            "noun.food",
            "noun.artifact",
            "noun.person",
            "verb.motion",
            "verb.communication",
            "adj.all",
        ],
        n_train=30,
        n_test=12,
    )
    multi_label(
        shared / "debtags",
        here / "debtags-sample",
        ["use", "works-with", "implemented-in"],
        n_train=240,
        n_test=60,
    )
