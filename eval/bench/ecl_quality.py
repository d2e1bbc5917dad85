"""Quality of the ECL alone, every scorer, on a learned store: embeds the test file once.

Learn the store with the CLI first (``learn`` ends with the fit step, which chooses what ``auto``
stands for; a store learned with ``--no-fit`` gets it fitted here), then:
    python eval/bench/ecl_quality.py --store STORE --gold dev.jsonl [--k 10] [--out table.json]
Prints one row per scorer and one for ``auto``; for a single-label store, also a scikit-learn
``LogisticRegression`` trained jointly on the store's vectors in the same run, its ``C`` chosen on
the gold file (``--logreg-c``; ``--logreg-c ''`` skips it). Each row has
(single-label: accuracy, recall@5, recall@10; multi-label: RP@5, RP@10,
mAP, micro-F1 of the chosen sets, recall@50), and the time spent embedding next to the time spent
in the ECL, measured in the same run: ``overhead`` is (embedding + ECL) / embedding, the cost of
evaluating the ECL on the whole file relative to embedding it.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from icl_cl import ContinualClassifier
from icl_cl.config import SCORERS
from icl_cl.evaluation.outputs import Decision
from icl_cl.evaluation.protocol import score_decisions
from icl_cl.inputs import read_examples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True)
    parser.add_argument("--gold", required=True)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--out")
    parser.add_argument("--logreg-c", default="1,3,10,30", help="C values tried (comma list)")
    args = parser.parse_args()
    clf = ContinualClassifier.open(args.store)
    clf.fit(use_llm=False)  # the auto choice (kept when it is current)
    gold, _ = read_examples(args.gold, max_chars=10**6)
    known = set(clf.memory.stats.labels)
    gold = [ex for ex in gold if set(ex.labels) & known]
    t = time.perf_counter()
    queries = clf.embedder.encode([ex.text for ex in gold])
    embed_s = time.perf_counter() - t
    multi = bool(clf.memory.multi_label)
    rows = {}
    for name in [*SCORERS, "auto"]:
        t = time.perf_counter()
        preds = clf.predict_vectors(queries, args.k, scorer=name)
        ecl_s = time.perf_counter() - t
        full = clf.memory.score_matrix(queries, name) if multi else None
        decisions = [Decision.from_prediction(p) for p in preds]
        quality = score_decisions(gold, decisions, multi, args.k, full, clf.memory.stats.labels)
        if not multi:
            rankings = [[c.label for c in p.candidates] for p in preds]
            from icl_cl import metrics

            for k in (5, 10):
                quality[f"recall@{k}"] = metrics.top_k_accuracy(
                    [ex.labels[0] for ex in gold], rankings, k
                )
        rows[name] = {
            **quality,
            "ecl_seconds": ecl_s,
            "ecl_ms_per_item": 1000 * ecl_s / len(gold),
            "overhead": (embed_s + ecl_s) / embed_s,
        }
        print(json.dumps({"scorer": name, **{k: round(v, 4) for k, v in rows[name].items()}}))
    if not multi and args.logreg_c:
        cs = [float(c) for c in args.logreg_c.split(",")]
        rows["logreg"] = logistic_regression(clf, gold, queries, cs)
        print(json.dumps({"scorer": "logreg", **rows["logreg"]}))
    result = {
        "store": args.store,
        "items": len(gold),
        "embed_seconds": embed_s,
        "default_scorer": clf.memory.resolve_scorer(),
        "auto": clf.memory.choice.summary(clf.memory.n_examples) if clf.memory.choice else None,
        "scorers": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "scorers"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


def logistic_regression(
    clf: ContinualClassifier, gold: list, queries: np.ndarray, cs: list[float]
) -> dict[str, Any]:
    """A multinomial logistic regression trained jointly on every stored vector, for each C;
    the row is the C with the best accuracy on the gold items (chosen on them: an upper bound)."""
    from sklearn.linear_model import LogisticRegression

    x = clf.memory.index.vectors_all()
    y = [labels[0] for labels in clf.memory.store.row_labels()]
    truth = np.array([ex.labels[0] for ex in gold])
    by_c = {}
    for c in cs:
        t = time.perf_counter()
        model = LogisticRegression(C=c, max_iter=500).fit(x, y)
        accuracy = float((model.predict(queries) == truth).mean())
        by_c[c] = {"accuracy": round(accuracy, 4), "train_seconds": round(time.perf_counter() - t)}
        print(json.dumps({"logreg_C": c, **by_c[c]}), flush=True)
    best = max(by_c, key=lambda c: by_c[c]["accuracy"])
    return {**by_c[best], "C": best, "by_C": {str(c): v for c, v in by_c.items()}}


if __name__ == "__main__":
    main()
