"""Ray's overhead on one machine, and the cost of merging partial statistics.

1. Predict throughput of the same items in process and on a local Ray (Ray Data ``map_batches``
   over an actor pool, each actor opening the store read-only), as a ratio in one run. Both
   sides include opening the classifier (loading the embedder): in process once, on Ray once per
   actor. Ray's own start-up (``ray.init``) is timed separately and left out of the ratio. The
   in-process time of ``predict`` alone is reported too.
2. The driver's merge of partial statistics (one per shard) into one session's delta, for shards
   of ``--shard-labels`` labels each at the embedder's dimension, against the number of shards.

The store is learned from the first ``--train`` items of a training file; the items predicted
are the first ``--n`` of a dev file (e.g. 2,000 WordNet supersense dev items).

Usage: python eval/bench/ray_overhead.py --train train.jsonl --dev dev.jsonl [--n 2000]
           [--train-n 3000] [--actors 2] [--batch-size 256] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl import ContinualClassifier
from icl_cl.distributed import connect, predict
from icl_cl.inputs import read_examples
from icl_cl.memory.partial import merge, shard_statistics
from icl_cl.memory.statistics import RunningStatistics

K = 5


def _items(path: Path, n: int) -> list[dict[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            rows.append({"id": str(obj["id"]), "text": obj["text"]})
            if len(rows) == n:
                break
    return rows


def throughput(store: Path, items: list[dict[str, str]], actors: int, batch: int) -> dict:
    import ray

    texts = [i["text"] for i in items]
    start = time.perf_counter()
    with ContinualClassifier.open(store) as clf:
        opened = time.perf_counter()
        local = clf.predict(texts, k=K, use_llm=False)
    local_end = time.perf_counter()

    t = time.perf_counter()
    connect(num_cpus=os.cpu_count())
    ray_start = time.perf_counter() - t
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = ray.data.from_items(items)
    t = time.perf_counter()
    rows = predict(
        dataset, store=store, k=K, use_llm=False, actors=actors, batch_size=batch
    ).take_all()
    ray_seconds = time.perf_counter() - t
    remote = {r["id"]: json.loads(r["prediction"])["labels"] for r in rows}
    agree = sum(remote[i["id"]] == list(p.labels) for i, p in zip(items, local, strict=True))
    local_seconds = local_end - start
    return {
        "items": len(items),
        "cpus": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "actors": actors,
        "batch_size": batch,
        "ray_init_seconds": round(ray_start, 2),
        "in_process_seconds": round(local_seconds, 2),
        "in_process_predict_only_seconds": round(local_end - opened, 2),
        "ray_seconds": round(ray_seconds, 2),
        "in_process_items_per_second": round(len(items) / local_seconds, 1),
        "ray_items_per_second": round(len(items) / ray_seconds, 1),
        "ray_over_in_process": round(local_seconds / ray_seconds, 3),
        "same_labels": f"{agree}/{len(items)}",
    }


def merge_cost(dim: int, shard_labels: int, shard_sizes: list[int], repeats: int = 3) -> list:
    """Seconds to merge ``s`` shard statistics (each over ``shard_labels`` labels, half of them
    shared with the other shards) for each ``s`` in ``shard_sizes``."""
    rng = np.random.default_rng(0)
    out = []
    for shards in shard_sizes:
        parts = []
        for s in range(shards):
            names = [f"shared{j}" for j in range(shard_labels // 2)]
            names += [f"s{s}-{j}" for j in range(shard_labels - len(names))]
            vectors = rng.normal(size=(shard_labels, dim)).astype(np.float32)
            parts.append(shard_statistics(dim, vectors, [[n] for n in names]))
        best = min(_timed(lambda p=parts: merge(p, RunningStatistics(dim))) for _ in range(repeats))
        out.append(
            {
                "shards": shards,
                "labels_per_shard": shard_labels,
                "dim": dim,
                "seconds": round(best, 4),
                "per_shard_ms": round(1000 * best / shards, 2),
            }
        )
    return out


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--dev", type=Path, required=True)
    parser.add_argument("--train-n", type=int, default=3000)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shard-labels", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    examples, _ = read_examples(args.train, max_chars=10_000)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        t = time.perf_counter()
        with ContinualClassifier.open(store) as clf:
            clf.learn(examples[: args.train_n], k=K)
        learned = time.perf_counter() - t
        result = {
            "store": {"examples": args.train_n, "learn_and_fit_seconds": round(learned, 1)},
            "predict": throughput(store, _items(args.dev, args.n), args.actors, args.batch_size),
            "merge": merge_cost(384, args.shard_labels, [4, 16, 64]),
        }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
