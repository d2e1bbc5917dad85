"""Calibration of the fused classifier with given fusion weights (e.g. those of a fit where the
LLM earned weight), so that it can be measured whatever the current held-out draw decides.

The calibration is fitted as ``fit`` fits it (``calibration.heldout_llm`` held-out stored items
read by the default LLM), then the fused scores of ``--n`` dev items (a seeded sample) give
accuracy, ECE of the top probability, and coverage and size of the conformal sets.

Usage: python eval/bench/fused_calibration.py --store S --gold dev.jsonl --ecl 0.0799 --llm 0.419
           [--n 1000] [--k 10] [--confidence 0.9]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from icl_cl import ClassifierConfig, ContinualClassifier
from icl_cl.config import LLMConfig
from icl_cl.heads import FittedHeads, FusionWeights
from icl_cl.inputs import read_examples
from icl_cl.metrics import expected_calibration_error
from icl_cl.reading import LLMHandle
from icl_cl.steps import Steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True)
    parser.add_argument("--gold", required=True, help="single-label dev JSONL")
    parser.add_argument("--ecl", type=float, required=True, help="fusion weight of the ECL")
    parser.add_argument("--llm", type=float, required=True, help="fusion weight of the LLM")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gold, _ = read_examples(args.gold, max_chars=10**6)
    gold = random.Random(args.seed).sample(gold, min(args.n, len(gold)))
    weights = FusionWeights({"ecl": args.ecl, "llm": args.llm}, 0, {})
    llm = LLMHandle(Path(args.store) / "llm_cache.sqlite")
    with ContinualClassifier.open(args.store, ClassifierConfig(llm=LLMConfig())) as clf:
        steps = Steps(clf.memory, clf.embedder, clf.config, llm, writing=True)
        spec = steps.spec(args.k, None, use_llm=True)
        n = clf.memory.n_examples
        heads = FittedHeads.fit(
            spec, steps.heldout(spec), multi_label=False, n_examples=n, fusion=weights
        )
        calibrator = heads.calibrator
        texts = [ex.text for ex in gold]
        queries = clf.embedder.encode(texts)
        ranked = clf.memory.candidates(queries, args.k)
        cands = [[label for label, _ in c] for c in ranked]
        readings = steps.reader().read(texts, queries, cands).readings
    llm.close()
    top, correct, covered, sizes = [], [], [], []
    for c, reading, ex in zip(ranked, readings, gold, strict=True):
        fused = weights.combine({"ecl": np.array([s for _, s in c]), "llm": reading.scores})
        p = calibrator.probabilities(fused[None, :])[0]
        best = int(np.argmax(p))
        top.append(float(p[best]))
        correct.append(c[best][0] == ex.labels[0])
        chosen = calibrator.sets(p[None, :], args.confidence)[0]
        sizes.append(len(chosen))
        covered.append(ex.labels[0] in {c[j][0] for j in chosen})
    print(
        json.dumps(
            {
                "items": len(gold),
                "heldout_items": calibrator.heldout_items,
                "accuracy": float(np.mean(correct)),
                "ece": expected_calibration_error(top, correct),
                "coverage": float(np.mean(covered)),
                "set_size": float(np.mean(sizes)),
            }
        )
    )


if __name__ == "__main__":
    main()
