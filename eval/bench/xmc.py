"""Extreme multi-label paths on a learned store: the ECL alone, InCA-style, Infer-Retrieve-Rank,
and Infer-Retrieve-Rank with the ECL fused into retrieval, on the same dev items.

For each path: RP@5, RP@10, P@5, micro-F1 and macro-F1 of the chosen label sets (the configured
decision rule), micro-F1 of a fixed top-5 rule on the same rankings, mAP over the ranked
candidates, candidate recall@R of the path's candidate stage (``--recall-k``, default 50), and
LLM prompt tokens, calls and seconds per item (the one-off fusion/calibration fit on held-out
stored examples is timed apart). The LLM is the default model unless ``--llm-config`` names one.

The store is copied first: fitted parameters and LLM calls are cached in the copy (``--work``
keeps it, so a rerun reuses the cached calls).

Usage: python eval/bench/xmc.py --store STORE --gold dev.jsonl [--n 1000] [--k 10]
           [--paths ecl inca irr irr-ecl] [--heldout 200] [--work DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from icl_cl import ClassifierConfig, ContinualClassifier
from icl_cl.backends.cache import CachedBackend
from icl_cl.backends.registry import create_backend
from icl_cl.config import DecisionConfig, FusionConfig, IRRConfig, LLMConfig
from icl_cl.evaluation.outputs import Decision
from icl_cl.evaluation.protocol import score_decisions
from icl_cl.inputs import read_examples
from icl_cl.metrics import micro_f1, recall_at_k
from icl_cl.types import Example

PATHS = {
    "ecl": {},
    "inca": {"llm": True},
    "irr": {"llm": True, "irr": {}},
    "irr-ecl": {"llm": True, "irr": {"ecl": True}},
}
CHUNK = 50


def path_config(name: str, args: argparse.Namespace) -> ClassifierConfig:
    spec = PATHS[name]
    return ClassifierConfig(
        llm=LLMConfig() if spec.get("llm") else None,
        irr=IRRConfig(**spec["irr"]) if "irr" in spec else None,
        fusion=FusionConfig(heldout=args.heldout),
        decision=DecisionConfig(rule=args.decision),
    )


def run_path(
    name: str, store: Path, gold: list[Example], args: argparse.Namespace
) -> dict[str, Any]:
    texts = [ex.text for ex in gold]
    config = path_config(name, args)
    backend = None
    if config.llm is not None:  # every LLM call of the path through the copy's call cache
        model = create_backend(config.llm.backend, model=config.llm.model, **config.llm.options)
        backend = CachedBackend(model, store / "llm_cache.sqlite")
    with ContinualClassifier.open(store, config, backend=backend) as clf:
        queries = clf.embedder.encode(texts)
        start = time.perf_counter()
        clf.fit(args.k)
        fit_seconds = time.perf_counter() - start
        preds, start = [], time.perf_counter()
        for lo in tqdm(range(0, len(texts), CHUNK), desc=name, unit="chunk"):
            preds += clf.predict_vectors(
                queries[lo : lo + CHUNK], args.k, texts=texts[lo : lo + CHUNK]
            )
        seconds = time.perf_counter() - start
        # The candidate stage alone at the recall depth (the infer step's calls are cached).
        stage = clf.candidates(queries, args.recall_k, texts=texts)
    if backend is not None:
        backend.close()
    decisions = [Decision.from_prediction(p) for p in preds]
    gold_sets = [set(ex.labels) for ex in gold]
    row: dict[str, Any] = {
        "path": name,
        "items": len(gold),
        "k": args.k,
        **score_decisions(gold, decisions, True, args.k),
        "micro_f1_top5": micro_f1(gold_sets, [set(d.ranking[:5]) for d in decisions]),
        f"candidate_recall@{args.recall_k}": recall_at_k(
            gold_sets, [[lab for lab, _ in c] for c in stage], args.recall_k
        ),
        "prompt_tokens_per_item": float(
            np.mean([p.cost.prompt_tokens if p.cost else 0 for p in preds])
        ),
        "llm_calls_per_item": float(np.mean([p.cost.calls if p.cost else 0 for p in preds])),
        "seconds_per_item": seconds / len(gold),
        "fit_seconds": fit_seconds,
    }
    fusion = next((p.evidence.fusion_weights for p in preds if p.evidence.fusion_weights), None)
    if fusion:
        row["fusion"] = dict(fusion)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True, help="a learned multi-label store (copied)")
    parser.add_argument("--gold", required=True, help="dev JSONL with gold labels")
    parser.add_argument("--n", type=int, default=1000, help="dev items (a seeded sample)")
    parser.add_argument("--k", type=int, default=10, help="candidates the LLM reads")
    parser.add_argument("--recall-k", type=int, default=50)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--heldout", type=int, default=200, help="held-out items for fusion")
    parser.add_argument(
        "--decision",
        default="cardinality",
        choices=["cardinality", "threshold", "label_thresholds"],
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="keep the store copy (and its LLM call cache) here")
    parser.add_argument("--out")
    args = parser.parse_args()

    gold, _ = read_examples(args.gold, max_chars=10**6)
    gold = random.Random(args.seed).sample(gold, min(args.n, len(gold)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.work or tmp) / "store"
        if not store.exists():
            shutil.copytree(args.store, store, ignore=shutil.ignore_patterns("writer.lock"))
        for name in args.paths:
            row = run_path(name, store, gold, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
