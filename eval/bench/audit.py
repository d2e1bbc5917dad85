"""Finding wrong stored labels: ``ContinualClassifier.audit`` against cleanlab, on train labels
with known noise.

For each kind of noise, in one run:

1. ``--noise`` (5%) of the train items get another label: ``random``, uniformly among the other
   labels; ``confusable``, the label whose class mean (over the clean train vectors) is nearest
   to the item's own label's (the most confusable neighbour);
2. **ours**: a store learns the noisy train (``learn`` with its fit, vectors from ``--vectors``),
   then ``audit`` flags items (``audit_s`` is the audit alone, its held-out scoring of every
   stored item included; ``learn_s`` is the learn and fit, which the store does anyway);
3. **cleanlab**: ``cleanlab.filter.find_label_issues`` on 5-fold out-of-sample probabilities of a
   scikit-learn ``LogisticRegression`` on the same vectors and noisy labels (``cleanlab_s``: the
   cross-validated fits and the filter);
4. precision, recall and F1 of each method's flagged set against the flipped items, and of each
   method's ranking cut at the number of flipped items (ours: the audit's score; cleanlab: its
   label quality score, self-confidence);
5. with ``--gain``, top-1 accuracy on dev of a store learned from the noisy train, and of fresh
   stores learned without the items ours flagged (``removed``) or with them given the label the
   audit suggested (``relabelled``), and of a store learned from the train without noise
   (``clean``), as ``--gain`` lists them.

A multi-label dataset (debtags) gets tag noise instead, on ``--noise`` of the items: ``drop``
takes one tag off an item with two or more, ``add`` gives an item a tag it lacks, chosen at
random. Both methods are scored on the items they flag against the items changed (cleanlab's
``find_label_issues(..., multi_label=True)`` on the out-of-sample probabilities of a one-vs-rest
logistic regression, 5-fold); ours also on the tag itself: the dropped tag among the finding's
``missing``, the added one among its ``spurious``. ``--gain`` is for single-label datasets.

Usage:
    python eval/bench/audit.py --data DATASET_DIR --vectors train.npy [--dev-vectors dev.npy]
        [--kinds random,confusable | drop,add] [--noise 0.05] [--size N]
        [--gain removed,relabelled,clean] [--out OUT.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl import ContinualClassifier
from icl_cl.config import EmbedderConfig
from icl_cl.embedding import load_embedder
from icl_cl.embedding.given import GivenVectors
from icl_cl.inputs import read_examples, read_labels
from icl_cl.types import Example


def confusable_neighbours(vectors: np.ndarray, gold: np.ndarray, n_labels: int) -> np.ndarray:
    """Per label, the other label whose class mean is most similar (cosine)."""
    means = np.zeros((n_labels, vectors.shape[1]))
    np.add.at(means, gold, vectors)
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    sims = means @ means.T
    np.fill_diagonal(sims, -np.inf)
    return sims.argmax(axis=1)


def add_noise(
    gold: np.ndarray, kind: str, rate: float, vectors: np.ndarray, n_labels: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy labels and the flipped items: ``rate`` of them, at random or to the nearest label."""
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(gold), round(rate * len(gold)), replace=False)
    noisy = gold.copy()
    if kind == "random":
        shift = rng.integers(1, n_labels, len(flipped))
        noisy[flipped] = (gold[flipped] + shift) % n_labels
    elif kind == "confusable":
        noisy[flipped] = confusable_neighbours(vectors, gold, n_labels)[gold[flipped]]
    else:
        raise ValueError(f"unknown noise {kind!r}")
    return noisy, np.sort(flipped)


def add_tag_noise(
    tags: list[list[int]], kind: str, rate: float, n_labels: int, seed: int
) -> tuple[list[list[int]], dict[int, int]]:
    """Noisy tag lists, and per changed item the tag dropped (``drop``: one of an item with two
    or more) or added (``add``: one it lacks), ``rate`` of all the items, at random."""
    rng = np.random.default_rng(seed)
    n = round(rate * len(tags))
    noisy = [list(t) for t in tags]
    changed: dict[int, int] = {}
    if kind == "drop":
        for i in rng.choice([i for i, t in enumerate(tags) if len(t) >= 2], n, replace=False):
            changed[int(i)] = int(rng.choice(tags[i]))
            noisy[i].remove(changed[int(i)])
    elif kind == "add":
        for i in rng.choice(len(tags), n, replace=False):
            lacking = np.setdiff1d(np.arange(n_labels), tags[i])
            changed[int(i)] = int(rng.choice(lacking))
            noisy[i].append(changed[int(i)])
    else:
        raise ValueError(f"unknown tag noise {kind!r} (drop or add)")
    return noisy, changed


def scores(found: set[int], flipped: set[int]) -> dict[str, Any]:
    """Precision, recall and F1 of ``found`` against ``flipped``."""
    hits = len(found & flipped)
    p = hits / len(found) if found else 0.0
    r = hits / len(flipped) if flipped else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {
        "flagged": len(found),
        "precision": round(p, 4),
        "recall": round(r, 4),
        "f1": round(f1, 4),
    }


def _learned(
    path: Path, examples: list[Example], labels: list[Any], embedder: GivenVectors
) -> ContinualClassifier:
    shutil.rmtree(path, ignore_errors=True)
    clf = ContinualClassifier.open(path, embedder=embedder)
    clf.learn(examples, labels)
    return clf


def accuracy(clf: ContinualClassifier, dev: list[Example], vectors: np.ndarray) -> float:
    """Top-1 accuracy of the store's predictions (ECL, the store's ``auto``) on ``dev``."""
    preds = clf.predict_vectors(vectors, k=10)
    return float(np.mean([p.labels[0] == ex.labels[0] for p, ex in zip(preds, dev, strict=True)]))


def ours(
    work: Path, examples: list[Example], labels: list[Any], embedder: GivenVectors
) -> tuple[ContinualClassifier, Any, dict[str, float]]:
    """The store learned from ``examples``, its audit, and the seconds of each."""
    t = time.perf_counter()
    clf = _learned(work / "noisy", examples, labels, embedder)
    learn_s = time.perf_counter() - t
    t = time.perf_counter()
    report = clf.audit()
    audit_s = time.perf_counter() - t
    return clf, report, {"learn_s": round(learn_s, 1), "audit_s": round(audit_s, 1)}


def cleanlab_issues(
    vectors: np.ndarray, noisy: np.ndarray, folds: int, seed: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """cleanlab's flagged mask and label quality scores, from ``folds``-fold out-of-sample
    probabilities of a logistic regression; and the seconds it all took."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    t = time.perf_counter()
    model = LogisticRegression(max_iter=1000)
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    probs = cross_val_predict(model, vectors, noisy, cv=cv, method="predict_proba")
    mask = find_label_issues(noisy, probs)
    seconds = time.perf_counter() - t
    return mask, get_label_quality_scores(noisy, probs), seconds


def cleanlab_multi_label_issues(
    vectors: np.ndarray, tags: list[list[int]], n_labels: int, folds: int, seed: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """:func:`cleanlab_issues` for tag lists: a one-vs-rest logistic regression's out-of-sample
    probabilities (shuffled folds: stratifying needs one label an item)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.multilabel_classification import get_label_quality_scores
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.multiclass import OneVsRestClassifier

    t = time.perf_counter()
    y = np.zeros((len(tags), n_labels), np.int8)
    for i, row in enumerate(tags):
        y[i, row] = 1
    model = OneVsRestClassifier(LogisticRegression(max_iter=1000))
    cv = KFold(folds, shuffle=True, random_state=seed)
    probs = cross_val_predict(model, vectors, y, cv=cv, method="predict_proba")
    mask = find_label_issues(tags, probs, multi_label=True)
    seconds = time.perf_counter() - t
    return mask, get_label_quality_scores(tags, probs), seconds


def gain(
    work: Path,
    noisy_clf: ContinualClassifier,
    report: Any,
    train: list[Example],
    labels: list[Any],
    embedder: GivenVectors,
    dev: tuple[list[Example], np.ndarray],
    kinds: Sequence[str],
) -> dict[str, float]:
    """Dev accuracy of the noisy store, and of stores learned without the flagged items
    (``removed`` in ``kinds``) or with the labels the audit suggested (``relabelled``)."""
    out = {"noisy": accuracy(noisy_clf, *dev)}
    suggested = {f.id: f.suggested[0] for f in report.findings if f.suggested}
    removed = [ex for ex in train if ex.id not in suggested]
    relabelled = [
        Example(ex.id, ex.text, [suggested[ex.id]]) if ex.id in suggested else ex for ex in train
    ]
    for name, examples in (("removed", removed), ("relabelled", relabelled)):
        if name not in kinds:
            continue
        with _learned(work / name, examples, labels, embedder) as clf:
            out[name] = accuracy(clf, *dev)
        shutil.rmtree(work / name, ignore_errors=True)
    return {k: round(v, 4) for k, v in out.items()}


def compared(
    kind: str,
    word: str,
    truth: set[int],
    position: dict[str, int],
    audited: tuple[Any, dict[str, float]],
    cleanlab: tuple[np.ndarray, np.ndarray, float],
) -> dict[str, Any]:
    """One kind of noise's row: each method's flagged set, and its ranking cut at the number
    of ``word`` (flipped or changed) items, against ``truth``; with the audit's summary."""
    report, times = audited
    mask, quality, seconds = cleanlab
    n = len(truth)
    ranked = [position[ident] for ident, _ in report.scores]
    return {
        "kind": kind,
        "items": len(position),
        word: n,
        "ours": {**scores({position[f.id] for f in report.findings}, truth), **times},
        f"ours_at_{word}": scores(set(ranked[:n]), truth),
        "cleanlab": {
            **scores(set(np.flatnonzero(mask).tolist()), truth),
            "cleanlab_s": round(seconds, 1),
        },
        f"cleanlab_at_{word}": scores(set(np.argsort(quality, kind="stable")[:n].tolist()), truth),
        "audit": report.summary(),
    }


def run_kind(
    kind: str,
    args: argparse.Namespace,
    data: tuple[list[Example], np.ndarray, list[Any]],
    embedder: GivenVectors,
    work: Path,
    dev: tuple[list[Example], np.ndarray] | None,
) -> dict[str, Any]:
    """One kind of noise: ours and cleanlab on the same noisy labels."""
    train, vectors, labels = data
    names = [lab.label for lab in labels]
    col = {name: j for j, name in enumerate(names)}
    gold = np.array([col[ex.labels[0]] for ex in train])
    noisy, flipped = add_noise(gold, kind, args.noise, vectors, len(names), args.seed)
    examples = [Example(ex.id, ex.text, [names[noisy[i]]]) for i, ex in enumerate(train)]
    position = {ex.id: i for i, ex in enumerate(train)}
    clf, report, times = ours(work, examples, labels, embedder)
    found = cleanlab_issues(vectors, noisy, args.folds, args.seed)
    row = compared(kind, "flipped", set(flipped.tolist()), position, (report, times), found)
    if dev is not None:
        row["dev_accuracy"] = gain(
            work, clf, report, train, labels, embedder, dev, args.gain.split(",")
        )
    clf.close()
    shutil.rmtree(work / "noisy", ignore_errors=True)
    return row


def run_multi_label_kind(
    kind: str,
    args: argparse.Namespace,
    data: tuple[list[Example], np.ndarray, list[Any]],
    embedder: GivenVectors,
    work: Path,
) -> dict[str, Any]:
    """One kind of tag noise: ours and cleanlab on the same noisy tags."""
    train, vectors, labels = data
    names = [lab.label for lab in labels]
    col = {name: j for j, name in enumerate(names)}
    tags = [[col[lab] for lab in ex.labels] for ex in train]
    noisy, changed = add_tag_noise(tags, kind, args.noise, len(names), args.seed)
    examples = [Example(ex.id, ex.text, [names[c] for c in noisy[i]]) for i, ex in enumerate(train)]
    position = {ex.id: i for i, ex in enumerate(train)}
    clf, report, times = ours(work, examples, labels, embedder)
    found = cleanlab_multi_label_issues(vectors, noisy, len(names), args.folds, args.seed)
    row = compared(kind, "changed", set(changed), position, (report, times), found)
    # The tag itself: dropped ones should come back as missing, added ones as spurious.
    side = "missing" if kind == "drop" else "spurious"
    tag_hits = sum(
        names[changed[position[f.id]]] in getattr(f, side)
        for f in report.findings
        if position[f.id] in changed
    )
    row["ours_tag_recall"] = round(tag_hits / len(changed), 4) if changed else 0.0
    clf.close()
    shutil.rmtree(work / "noisy", ignore_errors=True)
    return row


def clean_accuracy(
    work: Path, data: tuple[list[Example], np.ndarray, list[Any]], embedder: GivenVectors,
    dev: tuple[list[Example], np.ndarray],
) -> float:  # fmt: skip
    """Dev accuracy of a store learned from the train without noise."""
    with _learned(work / "clean", data[0], data[2], embedder) as clf:
        acc = accuracy(clf, *dev)
    shutil.rmtree(work / "clean", ignore_errors=True)
    return round(acc, 4)


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The train (a seeded subset of ``--size``), its vectors and labels, and dev if asked."""
    data = Path(args.data)
    train, _ = read_examples(data / "train.jsonl", max_chars=10**6)
    labels, _ = read_labels(data / "labels.jsonl")
    vectors = np.load(args.vectors).astype(np.float32)
    if args.size and args.size < len(train):
        keep = np.sort(
            np.random.default_rng(args.seed).choice(len(train), args.size, replace=False)
        )
        train, vectors = [train[i] for i in keep], vectors[keep]
    dev = None
    if args.gain:
        dev_examples, _ = read_examples(data / "dev.jsonl", max_chars=10**6)
        dev = (dev_examples, np.load(args.dev_vectors).astype(np.float32))
    return (train, vectors, labels), dev, {ex.text: vectors[i] for i, ex in enumerate(train)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="dataset folder (single- or multi-label)")
    parser.add_argument("--vectors", required=True, help=".npy of the train file's vectors")
    parser.add_argument("--dev-vectors", help=".npy of the dev file's vectors (with --gain)")
    parser.add_argument(
        "--kinds",
        help="noise: random,confusable (the default); multi-label: drop,add (its default)",
    )
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--size", type=int, help="a seeded subset of train (default: all)")
    parser.add_argument("--folds", type=int, default=5, help="cleanlab's cross-validation folds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--gain",
        help="dev accuracy of the noisy store and of stores learned after the audit, a list "
        "of: removed (without the flagged items), relabelled (with the suggested labels), clean "
        "(a store learned without noise)",
    )
    parser.add_argument("--work", help="folder for the stores (default: a temporary one)")
    parser.add_argument("--out")
    args = parser.parse_args()
    data, dev, given = _load(args)
    multi_label = any(len(ex.labels) != 1 for ex in data[0])
    if multi_label and args.gain:
        parser.error("--gain is for single-label datasets (its accuracy is top-1)")
    kinds = args.kinds or ("drop,add" if multi_label else "random,confusable")
    embedder = GivenVectors(load_embedder(EmbedderConfig()), given)
    result: dict[str, Any] = {"data": Path(args.data).name, "noise": args.noise, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for kind in kinds.split(","):
            if multi_label:
                row = run_multi_label_kind(kind, args, data, embedder, work)
            else:
                row = run_kind(kind, args, data, embedder, work, dev)
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
        if dev is not None and "clean" in args.gain.split(","):
            result["clean_dev_accuracy"] = clean_accuracy(work, data, embedder, dev)
            print(json.dumps({"clean_dev_accuracy": result["clean_dev_accuracy"]}), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
