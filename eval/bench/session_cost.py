"""What a session costs as the store grows: a 100-item session added to stores of 1k, 5k, 20k
and 70k examples, default config, through the public API (``learn`` with its fit, as
``icl-cl learn`` runs it).

For each size N, in one run:

1. a base store learns N train items (their vectors from ``--vectors``, a ``.npy`` aligned with
   the train file, when given: the base is not what is measured) and fits (``auto``'s choice and
   the heads at N);
2. the session's 100 other train items are embedded once alone (``embed_s``: the denominator),
   then learned into the base by a freshly opened classifier: ``session_s`` is open + learn +
   fit, everything the user waits for but the model load (the embedder object is shared);
3. ``first_predict_s``: a freshly opened classifier predicting one input (open included), and
   the same through the CLI (``icl-cl predict``, the whole command) when ``--cli`` is given;
4. the store's size on disk, per file kind;
5. with ``--dev`` (and ``--dev-vectors``), the base store's quality on the dev file through the
   product's predict (``auto``): top-1 for a single-label store, RP@5 for a multi-label one.

The target (issue: a session costs what it adds): ``session_s / embed_s <= 2`` plus a constant
of at most 5 s, flat in N. The ratio and ``session_s - 2 * embed_s`` are printed per size.

Usage:
    python eval/bench/session_cost.py --data DATASET_DIR [--vectors train.npy]
        [--sizes 1000,5000,20000,70000] [--session 100] [--cli] [--dev dev.jsonl
        --dev-vectors dev.npy] [--out runs/bench/session_cost.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
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
from icl_cl.types import Example


def _sizes_on_disk(store: Path) -> dict[str, float]:
    """Megabytes per kind of file: the database, the vectors, the feature state, the solved
    weights, the saved indexes."""
    kinds: dict[str, float] = {}
    for f in store.iterdir():
        name = f.name
        kind = (
            "solved weights"
            if ".solved." in name
            else "feature state"
            if name.startswith("features-")
            else "database"
            if name.startswith("store.sqlite")
            else "vectors"
            if name == "examples.f32"
            else "index"
            if name.endswith(".hnsw")
            else "other"
        )
        kinds[kind] = kinds.get(kind, 0.0) + f.stat().st_size / 2**20
    kinds["total"] = sum(kinds.values())
    return {k: round(v, 1) for k, v in kinds.items()}


def _cli_first_predict(store: Path, text: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        inp.write_text(json.dumps({"id": "q", "text": text}) + "\n")
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "icl_cl.cli", "-q", "predict", "--store", str(store)]
        subprocess.run([*cmd, "--input", str(inp), "--output", str(out)], check=True)
        return time.perf_counter() - t


def _quality(clf: ContinualClassifier, dev: list[Example], vectors: np.ndarray) -> dict[str, Any]:
    """The product's predictions on ``dev``: top-1 (single-label) or RP@5 (multi-label)."""
    from icl_cl import metrics

    t = time.perf_counter()
    preds = clf.predict_vectors(vectors, k=10)
    seconds = time.perf_counter() - t
    scorer = clf.memory.resolve_scorer(None)
    if clf.memory.multi_label:
        ranked = [[c.label for c in p.candidates] for p in preds]
        rp5 = metrics.rank_precision_at_k([list(ex.labels) for ex in dev], ranked, 5)
        return {
            "auto": scorer,
            "dev_rp@5": round(rp5, 4),
            "dev_ms_per_item": 1000 * seconds / len(dev),
        }
    top1 = float(np.mean([p.labels[0] == ex.labels[0] for p, ex in zip(preds, dev, strict=True)]))
    return {
        "auto": scorer,
        "dev_top1": round(top1, 4),
        "dev_ms_per_item": 1000 * seconds / len(dev),
    }


def measure(
    size: int,
    train: list[Example],
    labels: list[Any],
    embedder: GivenVectors,
    session: int,
    work: Path,
    cli: bool,
    dev: tuple[list[Example], np.ndarray] | None = None,
) -> dict[str, Any]:
    """One size: the base store, then the measured session and first prediction."""
    store = work / f"store-{size}"
    shutil.rmtree(store, ignore_errors=True)
    base, new = train[:size], train[size : size + session]
    t = time.perf_counter()
    with ContinualClassifier.open(store, embedder=embedder) as clf:
        clf.learn(base, labels)
        base_s = time.perf_counter() - t
        quality = _quality(clf, *dev) if dev is not None else {}
        choice = clf.memory.choice  # the feature widths the fit kept, and each one's score
        if choice is not None:
            quality["feature_widths"] = dict(choice.widths)
            quality["width_heldout_quality"] = {
                k: dict(v) for k, v in choice.width_accuracy.items()
            }
    texts = [ex.text for ex in new]
    t = time.perf_counter()
    embedder.inner.encode(texts)
    embed_s = time.perf_counter() - t
    t = time.perf_counter()
    with ContinualClassifier.open(store, embedder=embedder.inner) as clf:
        report = clf.learn(new)
    session_s = time.perf_counter() - t
    t = time.perf_counter()
    with ContinualClassifier.open(store, embedder=embedder.inner) as clf:
        clf.predict([train[-1].text])
    first_s = time.perf_counter() - t
    row = {
        "size": size,
        **quality,
        "base_learn_fit_s": round(base_s, 2),
        "embed_s": round(embed_s, 3),
        "session_s": round(session_s, 3),
        "session_fit_s": round(report.fit_seconds, 3),
        "ratio": round(session_s / embed_s, 3),
        "over_2x_embedding_s": round(session_s - 2 * embed_s, 3),
        "first_predict_s": round(first_s, 3),
        "disk_mb": _sizes_on_disk(store),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if cli:
        row["cli_first_predict_s"] = round(_cli_first_predict(store, train[-1].text), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="dataset folder (train.jsonl, labels.jsonl)")
    parser.add_argument("--vectors", help=".npy of the train file's vectors (default MiniLM)")
    parser.add_argument("--sizes", default="1000,5000,20000,70000")
    parser.add_argument("--session", type=int, default=100)
    parser.add_argument("--cli", action="store_true", help="also time icl-cl predict")
    parser.add_argument("--work", help="folder for the stores (default: a temporary one)")
    parser.add_argument("--dev", help="dev file: the base stores' quality through predict")
    parser.add_argument("--dev-vectors", help=".npy of the dev file's vectors")
    parser.add_argument("--out")
    args = parser.parse_args()
    data = Path(args.data)
    train, _ = read_examples(data / "train.jsonl", max_chars=10**6)
    labels, _ = read_labels(data / "labels.jsonl")
    # A fixed shuffle, so that every size sees all labels and the session is new items.
    order = np.random.default_rng(0).permutation(len(train))
    inner = load_embedder(EmbedderConfig())
    given: dict[str, np.ndarray] = {}
    if args.vectors:
        vectors = np.load(args.vectors)
        given = {ex.text: vectors[i] for i, ex in enumerate(train)}
    train = [train[i] for i in order]
    embedder = GivenVectors(inner, given)
    sizes = [min(int(s), len(train) - args.session - 1) for s in args.sizes.split(",")]
    dev = None
    if args.dev:
        dev_examples, _ = read_examples(args.dev, max_chars=10**6)
        known = {lab.label for lab in labels}
        keep = [i for i, ex in enumerate(dev_examples) if set(ex.labels) & known]
        dev_vectors = (
            np.load(args.dev_vectors)
            if args.dev_vectors
            else inner.encode([ex.text for ex in dev_examples])
        )
        dev = ([dev_examples[i] for i in keep], dev_vectors[keep])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for size in sizes:
            row = measure(size, train, labels, embedder, args.session, work, args.cli, dev)
            print(json.dumps(row), flush=True)
            rows.append(row)
            shutil.rmtree(work / f"store-{size}", ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"data": str(data), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
