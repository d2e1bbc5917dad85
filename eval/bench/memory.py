"""Speed of the external continual learner, excluding the embedder.

1. Candidate search: p50/p95 per query (one query at a time) with N labels and M stored examples,
   for every scorer. Synthetic clustered unit vectors stand in for embeddings at this scale.
2. Learning cost against store size: time to learn one more session of 10 examples (each with a
   new label) into stores of 100, 1,000 and 10,000 labels.

Usage: python eval/bench/memory.py [--labels 10000] [--examples 100000] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from icl_cl.config import SCORERS, MemoryConfig
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.store import Store
from icl_cl.types import Example, Label

DIM = 384


def clustered(rng: np.random.Generator, centers: np.ndarray, labels: np.ndarray) -> np.ndarray:
    x = centers[labels] + 0.08 * rng.normal(size=(len(labels), centers.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(path: Path, n_labels: int, n_examples: int, seed: int = 0, chunk: int = 20_000):
    """A real store (SQLite + vector file) with synthetic vectors, learned in sessions."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_labels, DIM))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    store = Store.create(path, dim=DIM, embedder="synthetic", config={})
    ecl = ExternalContinualLearner.open(store, MemoryConfig())
    y = np.concatenate([np.arange(n_labels), rng.integers(0, n_labels, n_examples - n_labels)])
    for start in range(0, n_examples, chunk):
        ys = y[start : start + chunk]
        examples = [
            Example(f"e{start + i}", f"synthetic {start + i}", [f"L{v}"]) for i, v in enumerate(ys)
        ]
        new = [Label(f"L{v}") for v in dict.fromkeys(ys.tolist()) if ecl.label(f"L{v}") is None]
        ecl.learn(
            examples,
            clustered(rng, centers, ys),
            new,
            np.zeros((len(new), DIM), np.float32),
            multi_label=False,
        )
    return ecl, centers, rng


def bench_search(n_labels: int, n_examples: int, queries: int = 300) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ecl, centers, rng = build(Path(tmp) / "s", n_labels, n_examples)
        build_s = time.perf_counter() - t
        q = clustered(rng, centers, rng.integers(0, n_labels, queries))
        out = {
            "labels": n_labels,
            "examples": n_examples,
            "build_seconds": build_s,
            "index": ecl.index.kind,
            "scorers": {},
        }
        for name in SCORERS:
            t = time.perf_counter()
            ecl.candidates(q[:1], 10, name)  # builds the scorer from the statistics
            prep = time.perf_counter() - t
            times = []
            hits = 0
            truth = None
            for i in range(queries):
                t = time.perf_counter()
                cands = ecl.candidates(q[i : i + 1], 10, name)
                times.append(time.perf_counter() - t)
                hits += (
                    cands[0][0][0] == f"L{int(np.argmax(q[i] @ centers.T))}" if truth is None else 0
                )
            times.sort()
            out["scorers"][name] = {
                "prepare_seconds": prep,
                "p50_ms": 1000 * statistics.median(times),
                "p95_ms": 1000 * times[int(0.95 * len(times))],
            }
        ecl.store.close()
        return out


def bench_learn_growth(sizes=(100, 1000, 10_000), repeats: int = 5) -> list[dict]:
    rows = []
    for n_labels in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            ecl, centers, rng = build(Path(tmp) / "s", n_labels, max(n_labels, 2 * n_labels))
            times = []
            for r in range(repeats):
                vectors = clustered(rng, centers, rng.integers(0, n_labels, 10))
                examples = [
                    Example(f"new{r}-{i}", f"new text {r} {i}", [f"N{r}-{i}"]) for i in range(10)
                ]
                labels = [Label(f"N{r}-{i}") for i in range(10)]
                t = time.perf_counter()
                ecl.learn(examples, vectors, labels, vectors, multi_label=False)
                times.append(time.perf_counter() - t)
            rows.append(
                {
                    "labels": n_labels,
                    "examples": ecl.n_examples,
                    "learn_10_ms_median": 1000 * statistics.median(times),
                    "learn_10_ms_min": 1000 * min(times),
                }
            )
            ecl.store.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--labels", type=int, default=10_000)
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {
        "search": bench_search(args.labels, args.examples),
        "learn_growth": bench_learn_growth(),
    }
    s = result["search"]
    print(
        f"candidate search, {s['labels']} labels, {s['examples']} examples ({s['index']} example index):"
    )
    for name, r in s["scorers"].items():
        print(
            f"  {name:12s} p50 {r['p50_ms']:.3f} ms  p95 {r['p95_ms']:.3f} ms  "
            f"(prepare {r['prepare_seconds']:.2f} s once per session)"
        )
    print("learning one session of 10 examples with 10 new labels:")
    for r in result["learn_growth"]:
        print(
            f"  {r['labels']:>6} labels: median {r['learn_10_ms_median']:.1f} ms (min {r['learn_10_ms_min']:.1f} ms)"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
