"""Calibration on a learned store: ECE before/after, conformal coverage, and in-context methods.

Learn the store with the CLI first (``icl-cl learn``), then:

    # ECL alone: ECE of raw-score softmax (before) and calibrated probabilities (after),
    # split-conformal coverage and set size at --confidence, on every dev item.
    python eval/bench/calibration.py --store STORE --gold dev.jsonl --k 10

    # Then also sessions added one by one (labels split at random): ECE and coverage after
    # every session, on the dev items of the labels seen so far. Replays the store's own
    # vectors into a new store: the training set is not embedded again.
    python eval/bench/calibration.py --store STORE --gold dev.jsonl --k 10 --sessions 5

    # --fused adds the fused classifier (default LLM) on every dev item where fusion fitted the
    # LLM's weight to 0 (its decisions then need no LLM call).

    # With the default LLM: each in-context calibration method, LLM alone and fused, at each k,
    # on --n sampled dev items (fusion and calibration fitted on held-out stored examples).
    python eval/bench/calibration.py --store STORE --gold dev.jsonl --llm --n 500 --k 5 10 \\
        --methods none contextual domain batch

"Before" is the softmax (single-label) or sigmoid (multi-label) of the raw decision scores;
"after" is what ``predict`` returns. Multi-label ECE is over every (item, candidate) pair and
coverage is over gold labels (each gold label in the set).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl import ClassifierConfig, ContinualClassifier
from icl_cl.config import IN_CONTEXT_METHODS, CalibrationConfig, FusionConfig, LLMConfig
from icl_cl.evaluation.outputs import Decision
from icl_cl.evaluation.protocol import calibration_metrics
from icl_cl.evaluation.sessions import SessionSpec, split_sessions
from icl_cl.inputs import read_examples
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.store import Store
from icl_cl.metrics import expected_calibration_error, multilabel_ece
from icl_cl.types import Example, Prediction


def quality(gold: list[Example], preds: list[Prediction], multi: bool) -> dict[str, float]:
    """Accuracy, ECE before calibration, and (as the protocol reports them) ECE after,
    conformal coverage and set size."""
    gold_sets = [set(ex.labels) for ex in gold]
    if multi:
        before = [
            {c.label: float(1 / (1 + np.exp(-np.clip(c.score, -500, 500)))) for c in p.candidates}
            for p in preds
        ]
        out = {"ece_before": multilabel_ece(gold_sets, before)}
    else:
        correct = [p.labels[0] in g for p, g in zip(preds, gold_sets, strict=True)]
        raw = [np.array([c.score for c in p.candidates]) for p in preds]
        top_raw = [float(np.exp(r[0] - np.logaddexp.reduce(r))) for r in raw]
        out = {
            "accuracy": float(np.mean(correct)),
            "ece_before": expected_calibration_error(top_raw, correct),
        }
    after = calibration_metrics(gold_sets, [Decision.from_prediction(p) for p in preds], multi)
    out["ece_after"] = after.pop("ece")
    return {**out, **after}


def ecl_rows(
    args: argparse.Namespace, gold: list[Example], queries: np.ndarray, embed_s: float
) -> list[dict[str, Any]]:
    clf = ContinualClassifier.open(args.store)
    rows = []
    for k in args.k:
        t = time.perf_counter()
        clf.fit(k)
        fit_s = time.perf_counter() - t
        preds = clf.predict_vectors(queries, k, confidence=args.confidence)
        row = {
            "method": "ecl",
            "scorer": preds[0].scorer,
            "k": k,
            "items": len(gold),
            **quality(gold, preds, bool(clf.memory.multi_label)),
            "calibration_fit_seconds": fit_s,
            "embed_seconds": embed_s,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    clf.close()
    if args.fused:
        rows += fused_rows(args, gold, queries)
    return rows


def fused_rows(
    args: argparse.Namespace, gold: list[Example], queries: np.ndarray
) -> list[dict[str, Any]]:
    """The fused classifier (default LLM) on every dev item, where fusion gave the LLM weight 0
    on held-out data: its decisions then need no LLM call. Otherwise use --llm on a sample."""
    config = ClassifierConfig(llm=LLMConfig(), fusion=FusionConfig(heldout=args.heldout))
    clf = ContinualClassifier.open(args.store, config)
    rows = []
    for k in args.k:
        weights = clf.fit(k).fusion
        if weights.uses("llm"):
            print(
                f"k={k}: the LLM has weight {weights.weights['llm']:.3f}; measure it with --llm",
                flush=True,
            )
            continue
        preds = clf.predict_vectors(
            queries, k, texts=[ex.text for ex in gold], confidence=args.confidence
        )
        row = {
            "method": "fused (LLM weight 0)",
            "k": k,
            "items": len(gold),
            **quality(gold, preds, bool(clf.memory.multi_label)),
            "fusion": weights.to_dict(),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    clf.close()
    return rows


def session_rows(
    args: argparse.Namespace, gold: list[Example], queries: np.ndarray
) -> list[dict[str, Any]]:
    """Replay the store's examples (their stored vectors) into a new store, session by session."""
    source = ContinualClassifier.open(args.store)
    examples = source.memory.store.examples(list(range(source.memory.n_examples)))
    vectors = source.memory.index.vectors(list(range(source.memory.n_examples)))
    labels, label_vectors = source.memory.labels, source.memory.label_vectors
    multi = bool(source.memory.multi_label)
    sessions = split_sessions(
        SessionSpec(by="random", n=args.sessions, seed=args.seed), labels, examples
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.create(
            Path(tmp) / "replay",
            dim=source.embedder.dim,
            embedder=source.embedder.name,
            config=source.config.model_dump(mode="json"),
        )
        clf = ContinualClassifier(
            ExternalContinualLearner.open(store, source.config.memory),
            source.embedder,
            source.config,
        )
        seen: set[str] = set()
        col = {lab.label: i for i, lab in enumerate(labels)}
        for t, session in enumerate(sessions, start=1):
            new = set(session)
            # As in MLCIL, a session's items carry only that session's labels.
            batch = [
                (i, [lab for lab in ex.labels if lab in new])
                for i, ex in enumerate(examples)
                if set(ex.labels) & new
            ]
            clf.memory.learn(
                # An item seen again with other labels gets a new id, as the protocol does.
                [
                    Example(
                        ex.id if len(labs) == len(ex.labels) else f"{ex.id}#s{t}", ex.text, labs
                    )
                    for ex, labs in ((examples[i], labs) for i, labs in batch)
                ],
                vectors[[i for i, _ in batch]],
                [labels[col[lab]] for lab in session],
                label_vectors[[col[lab] for lab in session]],
                multi_label=multi,
            )
            seen |= new
            test = [
                (j, Example(ex.id, ex.text, [lab for lab in ex.labels if lab in seen]))
                for j, ex in enumerate(gold)
                if set(ex.labels) & seen
            ]
            preds = clf.predict_vectors(
                queries[[j for j, _ in test]], args.k[0], confidence=args.confidence
            )
            row = {
                "session": t,
                "labels_seen": len(seen),
                "items": len(test),
                **quality([ex for _, ex in test], preds, multi),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        clf.close()
    source.close()
    return rows


def llm_rows(args: argparse.Namespace, gold: list[Example]) -> list[dict[str, Any]]:
    gold = random.Random(args.seed).sample(gold, min(args.n, len(gold)))
    texts = [ex.text for ex in gold]
    rows: list[dict[str, Any]] = []
    queries = None
    for method in args.methods:
        config = ClassifierConfig(
            llm=LLMConfig(),
            fusion=FusionConfig(heldout=args.heldout),
            calibration=CalibrationConfig(in_context=method),
        )
        clf = ContinualClassifier.open(args.store, config)
        if queries is None:
            queries = clf.embedder.encode(texts)
        for k in args.k:
            t = time.perf_counter()
            weights = clf.fit(k).fusion
            fit_s = time.perf_counter() - t
            ranked = clf.memory.candidates(queries, k)
            cands = [[lab for lab, _ in c] for c in ranked]
            t = time.perf_counter()
            batch = clf.reader().read(texts, queries, cands)
            read_s = time.perf_counter() - t
            llm_ok = [
                r.scores is not None and c[int(np.argmax(r.scores))] == ex.labels[0]
                for r, c, ex in zip(batch.readings, cands, gold, strict=True)
            ]
            preds = clf.predict_vectors(queries, k, texts=texts, confidence=args.confidence)
            tokens = [r.prompt.tokens + r.calibration_tokens for r in batch.readings if r.prompt]
            row = {
                "method": method,
                "k": k,
                "items": len(gold),
                "candidate_recall": float(
                    np.mean([ex.labels[0] in c for ex, c in zip(gold, cands, strict=True)])
                ),
                "ecl_accuracy": float(
                    np.mean([c[0] == ex.labels[0] for c, ex in zip(cands, gold, strict=True)])
                ),
                "llm_accuracy": float(np.mean(llm_ok)),
                "fused": quality(gold, preds, False),
                "fusion": weights.to_dict(),
                "prompt_tokens_per_item": float(np.mean(tokens)) if tokens else 0.0,
                "read_seconds": read_s,
                "fit_seconds": fit_s,
                "llm_calls": batch.usage.calls,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        clf.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True)
    parser.add_argument("--gold", required=True, help="dev JSONL with gold labels")
    parser.add_argument("--k", type=int, nargs="+", default=[10])
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--llm", action="store_true", help="measure the LLM stage (single-label)")
    parser.add_argument(
        "--fused",
        action="store_true",
        help="also the fused classifier on every item, where the LLM's fitted weight is 0",
    )
    parser.add_argument(
        "--sessions", type=int, help="replay the store in this many class-incremental sessions"
    )
    parser.add_argument("--methods", nargs="+", default=list(IN_CONTEXT_METHODS))
    parser.add_argument("--n", type=int, default=500, help="dev items read by the LLM")
    parser.add_argument("--heldout", type=int, default=200, help="fusion held-out items")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    for method in args.methods:
        if method not in IN_CONTEXT_METHODS:
            parser.error(f"unknown method {method!r}; choose from {IN_CONTEXT_METHODS}")
    gold, _ = read_examples(args.gold, max_chars=10**6)
    if args.llm:
        rows = llm_rows(args, gold)
    else:
        clf = ContinualClassifier.open(args.store)
        t = time.perf_counter()
        queries = clf.embedder.encode([ex.text for ex in gold])
        embed_s = time.perf_counter() - t
        clf.close()
        rows = ecl_rows(args, gold, queries, embed_s)
        if args.sessions:
            rows += session_rows(args, gold, queries)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"store": args.store, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
