"""Choose TEEN's prototype calibration (``teen_alpha``, ``teen_tau``) without the dev split.

The few-shot protocol is simulated inside the train split: a seeded fifth of train is held out as
the test set, the rest is split into sessions (the first learns every example of its labels, each
later one ``--shots`` per label, as ``sessions: {shots: ...}`` in the eval harness), and every
(alpha, tau) of the grid is scored after the last session with each mean-based scorer. The
vectors come from a run folder's embedding cache (``--run``, as the eval harness fills it), so
nothing is embedded when that cache is seeded:
    python eval/bench/fewshot_calibration.py DATASET_FOLDER --run RUN_DIR [--out table.json]
Prints one row per (scorer, alpha, tau): base accuracy, novel accuracy and their harmonic mean.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from icl_cl import metrics
from icl_cl.config import EmbedderConfig, MemoryConfig
from icl_cl.embedding import load_embedder
from icl_cl.embedding.cache import CachedEmbedder
from icl_cl.evaluation.datasets import Dataset, DatasetSpec, load_dataset
from icl_cl.evaluation.protocol import EMBEDDINGS
from icl_cl.evaluation.sessions import SessionSpec, session_streams, split_sessions
from icl_cl.memory.random_features import RandomFeatures, feature_width
from icl_cl.memory.scorers import build_scorer
from icl_cl.memory.statistics import RunningStatistics


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset", help="folder with train.jsonl and labels.jsonl")
    parser.add_argument("--run", required=True, help="run folder whose embedding cache to use")
    parser.add_argument("--sessions", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2", help="protocol seeds (comma list)")
    parser.add_argument("--alphas", default="1,0.9,0.75,0.5,0.25")
    parser.add_argument("--taus", default="4,16,64")
    parser.add_argument("--scorers", default="ncm,mahalanobis,klda")
    parser.add_argument("--klda-features", type=int, default=2048)
    parser.add_argument("--out")
    args = parser.parse_args()
    # Only train is used: the test file is never read for the choice.
    data = load_dataset(DatasetSpec(path=args.dataset, test_file="train.jsonl"))
    embedder = CachedEmbedder(load_embedder(EmbedderConfig()), Path(args.run) / EMBEDDINGS)
    vectors = embedder.encode([ex.text for ex in data.train])
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows += _grid(args, data, vectors, seed)
    table: dict[tuple[str, float, float], list[dict[str, float]]] = {}
    for r in rows:
        table.setdefault((r["scorer"], r["alpha"], r["tau"]), []).append(r)
    print("| scorer | alpha | tau | base | novel | harmonic mean |\n|---|---|---|---|---|---|")
    for (scorer, alpha, tau), rs in table.items():
        mean = {k: float(np.mean([r[k] for r in rs])) for k in ("base", "novel", "hm")}
        print(
            f"| {scorer} | {alpha:g} | {tau:g} | {mean['base']:.3f} | {mean['novel']:.3f} "
            f"| {mean['hm']:.3f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


def _grid(args: argparse.Namespace, data: Dataset, vectors: np.ndarray, seed: int) -> list[dict]:
    """Every (scorer, alpha, tau) of the grid on one seed's protocol inside the train split."""
    rows = []
    order = list(range(len(data.train)))
    random.Random(seed).shuffle(order)
    held = set(order[: len(order) // 5])
    learn = [ex for i, ex in enumerate(data.train) if i not in held]
    test_idx = [i for i in sorted(held)]
    spec = SessionSpec(by="random", n=args.sessions, seed=seed, shots=args.shots)
    sessions = split_sessions(spec, data.labels, learn)
    streams = session_streams(spec, sessions, learn)
    shown = [ex for stream in streams for ex in stream]
    row_of = {ex.id: i for i, ex in enumerate(data.train)}
    x = vectors[[row_of[ex.id] for ex in shown]]
    base = set(sessions[0])
    novel = {lab for labs in sessions[1:] for lab in labs}
    gold = [data.train[i].labels[0] for i in test_idx]
    keep = [j for j, g in enumerate(gold) if g in base | novel]
    queries = vectors[[test_idx[j] for j in keep]]
    gold = [gold[j] for j in keep]
    for scorer in args.scorers.split(","):
        features = None
        if scorer == "klda":
            width = feature_width(len(shown), args.klda_features)
            features = RandomFeatures("rff", vectors.shape[1], width, seed)
            stats = RunningStatistics(width, weighted=False)
            stats.apply(stats.delta(x, [ex.labels for ex in shown], features.transform))
        else:
            stats = RunningStatistics(vectors.shape[1])
            stats.apply(stats.delta(x, [ex.labels for ex in shown]))
        for alpha in (float(a) for a in args.alphas.split(",")):
            for tau in (float(t) for t in args.taus.split(",")):
                if alpha == 1 and tau != float(args.taus.split(",")[0]):
                    continue  # alpha 1 is no calibration: one row is enough
                config = MemoryConfig(teen_alpha=alpha, teen_tau=tau)
                s = build_scorer(scorer, stats, config, None, None, features=features)  # type: ignore[arg-type]
                pred = [stats.labels[c] for c in np.argmax(s.scores(queries), axis=1)]
                b = [p == g for p, g in zip(pred, gold, strict=True) if g in base]
                n = [p == g for p, g in zip(pred, gold, strict=True) if g in novel]
                acc_b, acc_n = float(np.mean(b)), float(np.mean(n))
                rows.append(
                    {
                        "seed": seed,
                        "scorer": scorer,
                        "alpha": alpha,
                        "tau": tau,
                        "base": acc_b,
                        "novel": acc_n,
                        "hm": metrics.harmonic_mean(acc_b, acc_n),
                    }
                )
    return rows


if __name__ == "__main__":
    main()
