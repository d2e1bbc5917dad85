"""Infer-Retrieve-Rank at 100,000 labels: retrieval latency, flat against HNSW, and prompt size.

The label space is real: WordNet 3.0 synsets from Debian's ``wordnet-base`` package (lemma as
name, gloss as description; nouns first, then verbs, adjectives and adverbs, up to ``--labels``),
added as labels known by name only to a copy of a learned store (e.g. debtags, 449 labels).

1. Retrieval latency per input, excluding the embedder: the input's vector plus label-like
   queries (stand-ins for the infer step's output: the names of the item's gold labels) searched
   in the label index, best cosine per label kept. p50/p95 at the store's own label count and at
   100k, for the exact (flat) index and for HNSW; recall@N of HNSW against flat at 100k.
2. Prompt tokens per item of the rank step at both sizes (``--llm-items`` dev items read by the
   default LLM, infer step off so only the rank prompt is counted): they stay flat because only
   the top N labels enter the prompt.

Get the WordNet files without installing the package:
    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb wn   # then --wordnet wn/usr/share/wordnet

Usage: python eval/bench/label_scale.py --store STORE --gold dev.jsonl --wordnet DIR
           [--labels 100000] [--n 300] [--k 50] [--llm-items 30] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl import ClassifierConfig, ContinualClassifier
from icl_cl.candidates import InferRetrieveRank
from icl_cl.config import IRRConfig, LLMConfig, MemoryConfig
from icl_cl.inputs import read_examples
from icl_cl.types import Label

POS_FILES = [("n", "data.noun"), ("v", "data.verb"), ("a", "data.adj"), ("r", "data.adv")]


def wordnet_labels(folder: Path, limit: int) -> list[Label]:
    """WordNet synsets as labels: id ``wn:<pos>.<offset>``, first lemma as name, gloss."""
    labels: list[Label] = []
    for pos, name in POS_FILES:
        for line in (folder / name).read_text(encoding="utf-8", errors="replace").splitlines():
            if not line or line.startswith(" "):  # the licence header lines start with spaces
                continue
            fields, _, gloss = line.partition(" | ")
            parts = fields.split()
            lemma = parts[4].replace("_", " ")
            lemma = lemma.split("(")[0]  # adjective markers such as "(a)"
            labels.append(Label(f"wn:{pos}.{parts[0]}", lemma, gloss.strip()))
            if len(labels) == limit:
                return labels
    return labels


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": statistics.median(ms), "p95_ms": ms[int(0.95 * (len(ms) - 1))]}


def retrieval(
    clf: ContinualClassifier, vectors: np.ndarray, queries: list[list[str]], k: int
) -> tuple[dict[str, float], list[list[str]]]:
    """Per-input retrieval time (queries already embedded) and the retrieved labels."""
    # Retrieval alone: the ECL is never asked (irr.ecl is off), so it ranks nothing here.
    irr = InferRetrieveRank(
        clf.memory, clf.embedder, IRRConfig(infer=False, rank=False), lambda v, k: []
    )
    embedded = irr.embed_queries(queries)  # the embedder is not timed
    irr.retrieve(vectors[:1], embedded[:1], k)  # builds the label index once
    times, out = [], []
    for i in range(len(vectors)):
        t = time.perf_counter()
        got = irr.retrieve(vectors[i : i + 1], embedded[i : i + 1], k)
        times.append(time.perf_counter() - t)
        out.append([label for label, _ in got[0]])
    return percentiles(times), out


def prompt_tokens(store: Path, texts: list[str], k: int) -> dict[str, float]:
    """The rank step's prompt: the LLM reads the top-k retrieved labels of each text (read
    directly, whatever weight the fusion would give it)."""
    config = ClassifierConfig(llm=LLMConfig(), irr=IRRConfig(infer=False))
    with ContinualClassifier.open(store, config) as clf:
        queries = clf.embedder.encode(texts)
        t = time.perf_counter()
        cands = [[lab for lab, _ in c] for c in clf.candidates(queries, k, texts=texts)]
        readings = clf.reader().read(texts, queries, cands).readings
        seconds = time.perf_counter() - t
    tokens = [r.prompt.tokens for r in readings if r.prompt is not None]
    return {
        "rank_prompt_tokens_per_item": float(np.mean(tokens)),
        "rank_seconds_per_item": seconds / len(texts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", required=True, help="a learned store (copied, not changed)")
    parser.add_argument("--gold", required=True, help="dev JSONL (texts and gold labels)")
    parser.add_argument("--wordnet", required=True, help="folder with WordNet's data.* files")
    parser.add_argument("--labels", type=int, default=100_000)
    parser.add_argument("--n", type=int, default=300, help="dev items timed")
    parser.add_argument("--k", type=int, default=50, help="labels retrieved (rank_topk)")
    parser.add_argument("--llm-items", type=int, default=30, help="dev items read by the LLM")
    parser.add_argument("--work", help="keep the 100k-label store here (default: a temp folder)")
    parser.add_argument("--out")
    args = parser.parse_args()

    gold, _ = read_examples(args.gold, max_chars=10**6)
    gold = gold[: args.n]
    rows: dict[str, Any] = {"store": args.store, "items": len(gold), "k": args.k}
    extra = wordnet_labels(Path(args.wordnet), args.labels)
    with tempfile.TemporaryDirectory() as tmp:
        small_copy = Path(tmp) / "small"
        shutil.copytree(args.store, small_copy, ignore=shutil.ignore_patterns("writer.lock"))
        big = Path(args.work or tmp) / "store"
        if not big.exists():
            shutil.copytree(args.store, big, ignore=shutil.ignore_patterns("writer.lock"))
            with ContinualClassifier.open(big) as clf:
                known = {lab.label for lab in clf.memory.labels}
                t = time.perf_counter()
                clf.learn([], [lab for lab in extra if lab.label not in known])
                rows["add_labels_seconds"] = time.perf_counter() - t
        with ContinualClassifier.open(args.store) as small:
            names = {lab.label: lab.name for lab in small.memory.labels}
            queries = [[names[x] for x in ex.labels][:5] for ex in gold]
            vectors = small.embedder.encode([ex.text for ex in gold])
            rows["small"] = {"labels": len(small.memory.labels)}
            rows["small"]["flat"], _ = retrieval(small, vectors, queries, args.k)
        for kind, exact_max in (("flat", 10**9), ("hnsw", MemoryConfig().label_exact_search_max)):
            memory = MemoryConfig(label_exact_search_max=exact_max)
            with ContinualClassifier.open(big, memory=memory) as clf:
                rows.setdefault("large", {"labels": len(clf.memory.labels)})
                rows["large"][kind], got = retrieval(clf, vectors, queries, args.k)
                rows["large"][kind]["index"] = (
                    "flat" if exact_max > len(clf.memory.labels) else "hnsw"
                )
                rows[f"_{kind}"] = got
        flat, hnsw = rows.pop("_flat"), rows.pop("_hnsw")
        rows["large"]["hnsw_recall_at_k_vs_flat"] = float(
            np.mean(
                [len(set(a) & set(b)) / max(len(a), 1) for a, b in zip(flat, hnsw, strict=True)]
            )
        )
        texts = [ex.text for ex in gold[: args.llm_items]]
        if texts:
            rows["small"].update(prompt_tokens(small_copy, texts, args.k))
            rows["large"].update(prompt_tokens(big, texts, args.k))
    print(json.dumps(rows, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
