"""Quality of the ECL alone, every scorer, on a learned store: embeds the test file once.

Learn the store with the CLI first, then:
    python eval/bench/ecl_quality.py --store STORE --gold dev.jsonl [--k 10] [--out table.json]
Prints one row per scorer (single-label: accuracy, recall@5, recall@10; multi-label: RP@5, RP@10,
mAP, micro-F1 of the chosen sets, recall@50), and the time spent embedding next to the time spent
in the ECL, measured in the same run: ``overhead`` is (embedding + ECL) / embedding, the cost of
evaluating the ECL on the whole file relative to embedding it.
"""

from __future__ import annotations

import argparse
import json
import time

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
    args = parser.parse_args()
    clf = ContinualClassifier.open(args.store)
    gold, _ = read_examples(args.gold, max_chars=10**6)
    known = set(clf.memory.stats.labels)
    gold = [ex for ex in gold if set(ex.labels) & known]
    t = time.perf_counter()
    queries = clf.embedder.encode([ex.text for ex in gold])
    embed_s = time.perf_counter() - t
    multi = bool(clf.memory.multi_label)
    rows = {}
    for name in SCORERS:
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
    result = {
        "store": args.store,
        "items": len(gold),
        "embed_seconds": embed_s,
        "default_scorer": clf.memory.resolve_scorer(),
        "scorers": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "scorers"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
