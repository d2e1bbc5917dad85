"""Embedding speed and accuracy: torch (packed, the default, and padded) against the ONNX
backend (fp32 and dynamic int8).

Speed, every backend on the same items in one run, rounds interleaved so they share the
machine's load; a ``-chunked`` arm is the encoding loop before the length sort (512 items per
call in input order, sentence-transformers sorting within each call); ``torch-padded`` is torch
without sequence packing (length-sorted padded batches). ``--call-items N`` hands every arm the
items N at a time, in input order, as the service's micro-batches do:
    python eval/bench/embedding_speed.py speed --data dev.jsonl [--data other.jsonl] \
        [--n 1024] [--rounds 3] [--arms torch-chunked,torch,torch-padded,onnx-fp32,onnx-int8] \
        [--call-items N] [--out speed.json]

Accuracy on dev after learning all of train (the product's ECL, every scorer), with the torch
vectors and the int8 vectors of the same items:
    python eval/bench/embedding_speed.py accuracy --dataset DATASET_DIR --vecs VECS_DIR \
        [--out accuracy.json]
``VECS_DIR`` holds ``{dataset}_{split}.npy`` (torch, float32, rows in file order) with a
``.json`` list of ``[id, labels]`` per row; with ``--embed-torch``, missing ones are embedded
and saved there.
The int8 vectors are saved (or reused) the same way as ``onnx_{dataset}_{split}.npy``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from icl_cl import ClassifierConfig, ContinualClassifier, EmbedderConfig
from icl_cl.config import SCORERS
from icl_cl.embedding import load_embedder
from icl_cl.embedding.base import Embedder
from icl_cl.embedding.given import GivenVectors
from icl_cl.evaluation.outputs import Decision
from icl_cl.evaluation.protocol import score_decisions
from icl_cl.inputs import read_examples, read_labels
from icl_cl.types import Example

# The old loop's chunk: one sentence-transformers call per 512 items, in input order.
OLD_CHUNK = 512
BACKENDS = {
    "torch": EmbedderConfig(),
    "torch-padded": EmbedderConfig(pack=False),
    "onnx-fp32": EmbedderConfig(backend="onnx"),
    "onnx-int8": EmbedderConfig(backend="onnx", quantize="int8"),
}


def _texts(path: str, n: int) -> list[str]:
    examples, _ = read_examples(path, max_chars=10**6)
    return [ex.text for ex in examples[:n]]


def speed(args: argparse.Namespace) -> dict:
    names = args.arms.split(",")
    backends = {name.removesuffix("-chunked") for name in names}
    embedders = {name: load_embedder(BACKENDS[name]) for name in backends}
    for embedder in embedders.values():  # load (and export, once) before any timing
        embedder.encode(["warm up"])
    arms: dict[str, Callable[[list[str]], np.ndarray]] = {}
    for name in names:
        backend = name.removesuffix("-chunked")
        encode = embedders[backend].encode
        encode = encode if backend == name else _chunked(encode, OLD_CHUNK)
        arms[name] = _chunked(encode, args.call_items) if args.call_items else encode
    if "torch" not in arms:
        raise SystemExit("--arms must include torch, the reference")
    result = {}
    for path in args.data:
        items = _texts(path, args.n)
        seconds: dict[str, list[float]] = {arm: [] for arm in arms}
        vectors: dict[str, np.ndarray] = {}
        for _ in range(args.rounds):
            for arm, encode in arms.items():
                t = time.perf_counter()
                vectors[arm] = encode(items)
                seconds[arm].append(time.perf_counter() - t)
        rate = {arm: len(items) / statistics.median(s) for arm, s in seconds.items()}
        row = {
            "items": len(items),
            "call_items": args.call_items or len(items),
            "mean_chars": float(np.mean([len(t) for t in items])),
            "rounds": args.rounds,
            "items_per_s": rate,
            "seconds": seconds,
            "ratio_to_torch": {arm: rate[arm] / rate["torch"] for arm in arms},
            "cosine_to_torch": {
                arm: _cosine(vectors[arm], vectors["torch"]) for arm in arms if arm != "torch"
            },
        }
        result[path] = row
        print(json.dumps({"data": path, **{k: row[k] for k in row if k != "seconds"}}))
    return result


def _chunked(
    encode: Callable[[list[str]], np.ndarray], size: int
) -> Callable[[list[str]], np.ndarray]:
    """One call per ``size`` items, in input order."""
    return lambda items: np.concatenate(
        [encode(items[i : i + size]) for i in range(0, len(items), size)]
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(axis=1)
    return {
        "min": float(cos.min()),
        "p01": float(np.quantile(cos, 0.01)),
        "mean": float(cos.mean()),
    }


def _vectors(
    vecs: Path, stem: str, examples: list[Example], embedder: Embedder, embed: bool = True
) -> tuple[np.ndarray, float | None]:
    """Cached vectors of ``examples`` (checked against their ids), or embed and save them;
    returns the vectors and the items/s when they were embedded here."""
    npy, index = vecs / f"{stem}.npy", vecs / f"{stem}.json"
    if npy.exists() and index.exists():
        ids = [row[0] for row in json.loads(index.read_text())]
        if ids != [ex.id for ex in examples]:
            raise SystemExit(f"{index}: rows are not the dataset's items in file order")
        return np.load(npy), None
    if not embed:
        raise SystemExit(f"{npy} is missing (pass --embed-torch to embed it here)")
    t = time.perf_counter()
    vectors = embedder.encode([ex.text for ex in examples])
    rate = len(examples) / (time.perf_counter() - t)
    index.write_text(json.dumps([[ex.id, list(ex.labels)] for ex in examples]))
    tmp = npy.with_name(f".{npy.stem}.tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(npy)  # the .npy appears whole, after its .json
    print(json.dumps({"embedded": stem, "items": len(examples), "items_per_s": rate}), flush=True)
    return vectors, rate


def accuracy(args: argparse.Namespace) -> dict:
    dataset = Path(args.dataset)
    name = dataset.name
    vecs = Path(args.vecs)
    train, _ = read_examples(dataset / "train.jsonl", max_chars=10**6)
    dev, _ = read_examples(dataset / "dev.jsonl", max_chars=10**6)
    labels, _ = read_labels(dataset / "labels.jsonl")
    # int8 first: its vectors are saved even when the torch ones are not there yet.
    arms = {"onnx-int8": ("onnx_", BACKENDS["onnx-int8"]), "torch": ("", BACKENDS["torch"])}
    result: dict = {"dataset": name, "train": len(train), "dev": len(dev), "arms": {}}
    for arm, (prefix, config) in arms.items():
        inner = load_embedder(config)
        embed = arm != "torch" or args.embed_torch
        train_v, train_rate = _vectors(vecs, f"{prefix}{name}_train", train, inner, embed)
        dev_v, dev_rate = _vectors(vecs, f"{prefix}{name}_dev", dev, inner, embed)
        known = dict(zip([ex.text for ex in train + dev], np.vstack([train_v, dev_v]), strict=True))
        embedder = GivenVectors(inner, known)
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "store"
            with ContinualClassifier.open(
                store, ClassifierConfig(embedder=config), embedder=embedder
            ) as clf:
                t = time.perf_counter()
                clf.learn(train, labels, fit=False)  # each scorer is fitted as it is scored
                learn_s = time.perf_counter() - t
                rows = _score_every_scorer(clf, dev, dev_v, args.k)
        result["default_scorer"] = clf.memory.resolve_scorer()
        result["arms"][arm] = {
            "embedder": inner.name,
            "embed_items_per_s": {"train": train_rate, "dev": dev_rate},
            "learn_seconds": learn_s,
            "scorers": rows,
        }
        print(json.dumps({"arm": arm, **{s: _headline(r) for s, r in rows.items()}}), flush=True)
    int8_rows, torch_rows = (result["arms"][a]["scorers"] for a in arms)
    result["change_int8_minus_torch"] = {
        scorer: {m: int8_rows[scorer][m] - torch_rows[scorer][m] for m in _headline(row)}
        for scorer, row in torch_rows.items()
    }
    print(json.dumps({"change_int8_minus_torch": result["change_int8_minus_torch"]}))
    return result


def _score_every_scorer(
    clf: ContinualClassifier, dev: list[Example], dev_v: np.ndarray, k: int
) -> dict[str, dict[str, float]]:
    known = set(clf.memory.stats.labels)
    keep = [i for i, ex in enumerate(dev) if set(ex.labels) & known]
    gold, queries = [dev[i] for i in keep], dev_v[keep]
    multi = bool(clf.memory.multi_label)
    rows = {}
    for scorer in SCORERS:
        preds = clf.predict_vectors(queries, k, scorer=scorer)
        full = clf.memory.score_matrix(queries, scorer) if multi else None
        decisions = [Decision.from_prediction(p) for p in preds]
        rows[scorer] = score_decisions(gold, decisions, multi, k, full, clf.memory.stats.labels)
    return rows


def _headline(row: dict[str, float]) -> dict[str, float]:
    keys = ("rp@5", "rp@10", "micro_f1") if "rp@5" in row else ("accuracy",)
    return {key: round(row[key], 4) for key in keys}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed")
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--arms",
        default="torch-chunked,torch,torch-padded,onnx-fp32,onnx-int8",
        help="backends to time (torch, torch-padded, onnx-fp32, onnx-int8), each optionally "
        "with -chunked",
    )
    p.add_argument(
        "--call-items", type=int, default=0, help="items per encode call (0: all in one call)"
    )
    p.add_argument("--out")
    p = sub.add_parser("accuracy")
    p.add_argument("--dataset", required=True)
    p.add_argument("--vecs", required=True)
    p.add_argument("--embed-torch", action="store_true", help="embed missing torch vectors")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--out")
    args = parser.parse_args()
    result = speed(args) if args.command == "speed" else accuracy(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
