"""Score a predictions file (from `icl-cl predict`) against gold labels.

Usage: python eval/score.py --gold dev.jsonl --pred predictions.jsonl
Single-label gold: accuracy and recall@k of the scored candidates.
Multi-label gold: RP@5, RP@10, P@5, micro/macro-F1 of the chosen sets, recall@k.
"""

from __future__ import annotations

import argparse
import json

from icl_cl import metrics
from icl_cl.inputs import iter_jsonl


def score(gold_path: str, pred_path: str) -> dict[str, float]:
    gold = {str(obj["id"]): obj["labels"] for _, obj in iter_jsonl(gold_path)}
    preds = {str(obj["id"]): obj for _, obj in iter_jsonl(pred_path)}
    missing = set(gold) - set(preds)
    if missing:
        raise SystemExit(f"{len(missing)} gold ids have no prediction, e.g. {sorted(missing)[:3]}")
    ids = list(gold)
    rankings = [sorted(preds[i]["scores"], key=preds[i]["scores"].get, reverse=True) for i in ids]
    k = min(len(r) for r in rankings)
    if all(len(gold[i]) == 1 for i in ids):
        return {
            "items": len(ids),
            "accuracy": metrics.accuracy(
                [gold[i][0] for i in ids], [preds[i]["labels"][0] for i in ids]
            ),
            f"recall@{k}": metrics.top_k_accuracy([gold[i][0] for i in ids], rankings, k),
        }
    gold_sets = [set(gold[i]) for i in ids]
    chosen = [set(preds[i]["labels"]) for i in ids]
    return {
        "items": len(ids),
        "rp@5": metrics.rank_precision_at_k(gold_sets, rankings, 5),
        "rp@10": metrics.rank_precision_at_k(gold_sets, rankings, 10),
        "p@5": metrics.precision_at_k(gold_sets, rankings, 5),
        "micro_f1": metrics.micro_f1(gold_sets, chosen),
        "macro_f1": metrics.macro_f1(gold_sets, chosen, labels=sorted(set().union(*gold_sets))),
        f"recall@{k}": metrics.recall_at_k(gold_sets, rankings, k),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gold", required=True)
    parser.add_argument("--pred", required=True)
    args = parser.parse_args()
    print(json.dumps(score(args.gold, args.pred), indent=2))


if __name__ == "__main__":
    main()
