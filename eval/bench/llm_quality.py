"""ECL alone vs LLM alone (over the same candidates) vs fused, per k and prompt strategy.

Needs a store learned from the full training set (icl-cl learn). Embeds the sampled dev items
once; for each (strategy, k) fits the fusion weights on held-out stored examples (as predict
does), then reads every item with the LLM and reports accuracy next to cost.

Usage: python eval/bench/llm_quality.py --store STORE --gold dev.jsonl [--n 1000] [--k 5 10]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np

from icl_cl import ClassifierConfig, ContinualClassifier
from icl_cl.config import FusionConfig, LLMConfig, PromptConfig
from icl_cl.inputs import read_examples

STRATEGIES = {
    "knn4-descriptions": PromptConfig(
        demonstrations="knn", n_demonstrations=4, label_presentation="descriptions"
    ),
    "zero-shot-names": PromptConfig(
        demonstrations="none", n_demonstrations=0, label_presentation="names"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True)
    parser.add_argument("--gold", required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10])
    parser.add_argument(
        "--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES)
    )
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()

    gold, _ = read_examples(args.gold, max_chars=10**6)
    gold = random.Random(args.seed).sample(gold, min(args.n, len(gold)))
    texts = [ex.text for ex in gold]
    rows = []
    queries = None
    for strategy in args.strategies:
        config = ClassifierConfig(
            llm=LLMConfig(), prompt=STRATEGIES[strategy], fusion=FusionConfig(heldout=args.heldout)
        )
        clf = ContinualClassifier.open(args.store, config)
        if queries is None:
            t = time.perf_counter()
            queries = clf.embedder.encode(texts)
            embed_s = time.perf_counter() - t
        for k in args.k:
            t = time.perf_counter()
            weights = clf.fit(k).fusion
            fit_s = time.perf_counter() - t
            t = time.perf_counter()
            ranked = clf.memory.candidates(queries, k)
            ecl_s = time.perf_counter() - t
            cands = [[lab for lab, _ in c] for c in ranked]
            t = time.perf_counter()
            batch = clf.reader().read(texts, queries, cands)
            llm_s = time.perf_counter() - t
            ecl_ok, llm_ok, fused_ok, tokens = [], [], [], []
            for ex, c, ranked_i, reading in zip(gold, cands, ranked, batch.readings, strict=True):
                ecl = np.array([s for _, s in ranked_i])
                truth = ex.labels[0]
                ecl_ok.append(c[int(np.argmax(ecl))] == truth)
                llm = reading.scores
                llm_ok.append(llm is not None and c[int(np.argmax(llm))] == truth)
                fused = weights.combine({"ecl": ecl, "llm": llm})
                fused_ok.append(c[int(np.argmax(fused))] == truth)
                tokens.append(reading.prompt.tokens if reading.prompt else 0)
            row = {
                "strategy": strategy,
                "k": k,
                "items": len(gold),
                "candidate_recall": float(
                    np.mean([ex.labels[0] in c for ex, c in zip(gold, cands, strict=True)])
                ),
                "ecl_accuracy": float(np.mean(ecl_ok)),
                "llm_accuracy": float(np.mean(llm_ok)),
                "fused_accuracy": float(np.mean(fused_ok)),
                "fusion": weights.to_dict(),
                "prompt_tokens_per_item": float(np.mean(tokens)),
                "llm_items_per_second": len(gold) / llm_s,
                "ecl_items_per_second": len(gold) / ecl_s,
                "fused_items_per_second": len(gold)
                / (ecl_s + (llm_s if weights.uses("llm") else 0.0)),
                "forward_share_of_llm_time": batch.usage.forward_seconds / llm_s if llm_s else 0.0,
                "fit_seconds": fit_s,
                "llm_calls": batch.usage.calls,
                "cached_calls": batch.usage.cached_calls,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        clf.close()
    result = {"store": args.store, "embed_seconds": embed_s, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
