"""A fast simulation of the active-learning protocol, to compare forms of ``expected_change``
without a store, scored on held-out *train* items rather than dev.

The classifier is a numpy LDA like the ECL's ``mahalanobis`` scorer: class means, the pooled
within-label covariance shrunk by the Oracle Approximating Shrinkage weight, scores ``-d^2`` (no
few-shot prototype calibration, no fitted probabilities: ``p = softmax(-d^2 / 2)``, the LDA
posterior with equal priors). The protocol is ``icl-cl eval``'s (a seed of 2 per label, pools of
3,000 and at least 4 times the batch, batches of 35% of the labels used, at least 45, up to 8,000;
the labels to 95% of an all-of-train model's accuracy, against random's), but the test set is
``--test`` items held out of train, so the comparison does not use dev.

Strategies (the batch is the best of the pool under each):

- ``random``;
- ``margin``: ``1 - (p1 - p2)``;
- ``expected_change``: ``margin x sum_c p_c d_c / (n_c + 1)``, ``d_c`` the Mahalanobis distance
  (the product's form);
- ``euclidean``: the same with the Euclidean distance to the class means;
- ``squared``: the same with ``d_c^2``;
- ``change_only``: ``sum_c p_c d_c / (n_c + 1)`` without the margin;
- ``batch_counts``: ``expected_change`` picked one input at a time, each pick adding its
  probabilities to the counts ``n_c`` the next one is scored with (a batch spreads over labels);
- ``density``: ``expected_change`` times the input's mean cosine similarity to the pool
  (information density: typical inputs before outliers).

Usage:
    python eval/bench/active_learning_simulation.py --data DATASET_DIR --vectors train.npy
        [--strategies random,expected_change,...] [--seeds 0,1,2,3,4] [--test 5000]
        [--out runs/bench/active_learning_simulation.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from icl_cl.evaluation.active_learning import labels_to_reach, schedule
from icl_cl.inputs import read_examples
from icl_cl.memory.scorers import oas_shrinkage

STRATEGIES = (
    "random",
    "margin",
    "expected_change",
    "euclidean",
    "squared",
    "change_only",
    "batch_counts",
    "density",
)


class LDA:
    """Class means and an OAS-shrunk pooled covariance, from labelled vectors."""

    def __init__(self, x: np.ndarray, y: np.ndarray, n_labels: int) -> None:
        self.counts = np.bincount(y, minlength=n_labels)
        sums = np.zeros((n_labels, x.shape[1]))
        np.add.at(sums, y, x)
        self.seen = self.counts > 0
        self.means = np.zeros_like(sums)
        self.means[self.seen] = sums[self.seen] / self.counts[self.seen, None]
        centred = x - self.means[y]
        dof = max(len(y) - int(self.seen.sum()), 1)
        cov = centred.T @ centred / dof
        a, d = oas_shrinkage(cov, dof), cov.shape[0]
        cov = (1 - a) * cov + a * np.trace(cov) / d * np.eye(d)
        self.precision = np.linalg.inv(cov)

    def squared_distances(self, q: np.ndarray) -> np.ndarray:
        w = self.means @ self.precision
        d2 = (
            np.einsum("nd,de,ne->n", q, self.precision, q)[:, None]
            - 2 * q @ w.T
            + np.einsum("cd,cd->c", w, self.means)[None, :]
        )
        d2 = np.maximum(d2, 0.0)
        d2[:, ~self.seen] = np.inf
        return d2

    def probabilities(self, d2: np.ndarray) -> np.ndarray:
        s = -d2 / 2
        s -= s.max(axis=1, keepdims=True)
        p = np.exp(s)
        return p / p.sum(axis=1, keepdims=True)


def posterior(model: LDA, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each input's probabilities, margin ``1 - (p1 - p2)`` and squared distances to the class
    means (0 for a label with no example)."""
    d2 = model.squared_distances(q)
    p = model.probabilities(d2)
    top = np.sort(p, axis=1)
    return p, 1 - (top[:, -1] - top[:, -2]), np.where(np.isfinite(d2), d2, 0.0)


def distance(strategy: str, model: LDA, q: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """The distance a form of expected change weighs the shift of each mean by."""
    if strategy == "squared":
        return d2
    if strategy == "euclidean":
        squared = (q * q).sum(1)[:, None] - 2 * q @ model.means.T + (model.means**2).sum(1)
        return np.sqrt(np.maximum(squared, 0.0))
    return np.sqrt(d2)


def priority(strategy: str, model: LDA, q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each pool input's priority under ``strategy`` (higher first)."""
    if strategy == "random":
        return rng.random(len(q))
    p, margin, d2 = posterior(model, q)
    if strategy == "margin":
        return margin
    change = (p * distance(strategy, model, q, d2) / (model.counts + 1)).sum(axis=1)
    if strategy == "density":
        unit = q / np.linalg.norm(q, axis=1, keepdims=True)
        return margin * change * (unit @ unit.mean(axis=0))
    return change if strategy == "change_only" else margin * change


def batch_counts(model: LDA, q: np.ndarray, n: int) -> np.ndarray:
    """``expected_change`` one pick at a time, each adding its probabilities to the counts."""
    p, margin, d2 = posterior(model, q)
    weighted = margin[:, None] * p * np.sqrt(d2)
    counts = model.counts.astype(np.float64)
    free = np.ones(len(q), bool)
    picked = []
    for _ in range(n):
        score = np.where(free, (weighted / (counts + 1)).sum(axis=1), -np.inf)
        i = int(np.argmax(score))
        picked.append(i)
        free[i] = False
        counts += p[i]
    return np.asarray(picked)


def curve(
    strategy: str, seed: int, x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray
) -> list[dict[str, float]]:
    """Test top-1 after the seed and after each round."""
    n_labels = int(y.max()) + 1
    rng = np.random.default_rng(seed)
    labelled = [
        i
        for c in range(n_labels)
        for i in rng.choice(train[y[train] == c], min(2, int((y[train] == c).sum())), False)
    ]
    used = np.zeros(len(x), bool)
    used[labelled] = True
    points = []
    for n in [*schedule(len(labelled), 8000, 0.35, 45), 0]:
        model = LDA(x[used], y[used], n_labels)
        hits = model.squared_distances(x[test]).argmin(axis=1) == y[test]
        points.append({"labels": int(used.sum()), "accuracy": float(hits.mean())})
        if n == 0:
            break
        rest = train[~used[train]]
        pool = rng.choice(rest, min(len(rest), max(3000, 4 * n)), replace=False)
        if strategy == "batch_counts":
            used[pool[batch_counts(model, x[pool], n)]] = True
            continue
        score = priority(strategy, model, x[pool], rng)
        used[pool[np.argsort(-score, kind="stable")[:n]]] = True
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="dataset folder (train.jsonl)")
    parser.add_argument("--vectors", required=True, help=".npy aligned with train.jsonl")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--test", type=int, default=5000, help="train items held out to score")
    parser.add_argument("--out", default="runs/bench/active_learning_simulation.json")
    args = parser.parse_args()
    examples, _ = read_examples(Path(args.data) / "train.jsonl", max_chars=10**6)
    names = sorted({ex.labels[0] for ex in examples})
    y = np.array([names.index(ex.labels[0]) for ex in examples])
    x = np.load(args.vectors).astype(np.float64)
    order = np.random.default_rng(123).permutation(len(x))
    test, train = order[: args.test], order[args.test :]
    full = LDA(x[train], y[train], len(names))
    reference = float((full.squared_distances(x[test]).argmin(axis=1) == y[test]).mean())
    target = 0.95 * reference
    seeds = [int(s) for s in args.seeds.split(",")]
    result: dict = {"reference": reference, "target": target, "seeds": seeds, "needs": {}}
    for strategy in args.strategies.split(","):
        start = time.perf_counter()
        curves = [curve(strategy, seed, x, y, train, test) for seed in seeds]
        result["needs"][strategy] = [labels_to_reach(c, target) for c in curves]
        print(f"{strategy}: {result['needs'][strategy]} ({time.perf_counter() - start:.0f} s)")
    random_mean = np.mean(result["needs"]["random"])
    print(f"all of train: {reference:.4f}; 95% of it: {target:.4f}")
    for strategy, needs in result["needs"].items():
        ok = None not in needs
        ratio = f"{np.mean(needs) / random_mean:.2f}" if ok else "not reached"
        print(f"| {strategy} | {np.mean(needs) if ok else 'not reached'} | {ratio} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
