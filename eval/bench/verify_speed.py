"""How long ``icl-cl verify`` takes per 100k vectors, what share of random byte flips it finds, and
what share of a predict the checks on read take.

    python eval/bench/verify_speed.py --vectors 100000 --sessions 10 --flips 100
    python eval/bench/verify_speed.py --store STORE --input test.jsonl --repeat 3
    python eval/bench/verify_speed.py --train train.jsonl --label-file labels.jsonl --input test.jsonl
    python eval/bench/verify_speed.py --train train.jsonl --train-vectors train.npy \
        --label-file labels.jsonl --input dev.jsonl --input-limit 1000 --repeat 3

Without ``--input``: builds a store of ``--vectors`` random unit vectors (dim 384, as MiniLM's)
with short texts and ``--labels`` single labels, learned in ``--sessions`` sessions through the
store's own commit (no embedder, so the time is the store's), then times :func:`verify_store`
(each check and the total, best of ``--repeat``), and the reads a predict makes on open (label
and statistics rows, all vectors) with and without their checks. With ``--flips N``, it then
flips one random byte of the vector file N times and of the database N times, one at a time on a
fresh copy, and counts the flips verify reports; a flip it does not report is checked to have
left the database's dump and the vectors unchanged (bytes SQLite keeps no data in).

With ``--input``: runs ``icl-cl predict`` in this process on ``--store`` (or on a store learned
first from ``--train``), ``--repeat`` times, each with the cache of checked blocks emptied as in a
new process, and reports the seconds the checks on read took (hashing the vector blocks, checking
the rows' seals) beside the whole predict's, and their ratio, then the same for one more predict
with the blocks already checked (as a service that opened the store before). With
``--train-vectors`` (a ``.npy`` aligned with ``--train``), the store learns the train file in one
session through the public API, its fit included, with those vectors (nothing is embedded), as
a store of all of a large train file is built once; ``--input-limit N`` predicts the first N
inputs only.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

from icl_cl.cli import main as cli
from icl_cl.memory.checksums import READ_CHECKS, VERIFIED_BLOCKS
from icl_cl.memory.statistics import RunningStatistics
from icl_cl.memory.store import DATABASE, VECTORS, Store
from icl_cl.memory.verify import verify_store
from icl_cl.types import Example, Label

DIM = 384


def build(path: Path, n: int, sessions: int, n_labels: int, seed: int) -> None:
    """A store of ``n`` random unit vectors in ``sessions`` sessions."""
    rng = np.random.default_rng(seed)
    store = Store.create(path, dim=DIM, embedder="random-unit-vectors", config={})
    stats = RunningStatistics(DIM)
    for s, rows in enumerate(np.array_split(np.arange(n), sessions)):
        vectors = rng.standard_normal((len(rows), DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        examples = [
            Example(f"x{r}", f"example text number {r}", [f"label-{r % n_labels}"]) for r in rows
        ]
        delta = stats.delta(vectors, [ex.labels for ex in examples])
        new = [Label(name) for name in delta.new_labels]
        store.commit_session(
            examples=examples,
            vectors=vectors,
            new_labels=new,
            new_label_vectors=rng.standard_normal((len(new), DIM)).astype(np.float32),
            delta=delta,
            stats=stats,
            multi_label=False,
            seconds=0.0,
        )
        stats.apply(delta)
        print(f"session {s + 1}/{sessions} committed", flush=True)
    store.close()


def content(path: Path) -> str:
    """Digest of the database's dump and the vector file."""
    digest = hashlib.sha256()
    try:
        conn = sqlite3.connect(f"file:{path / DATABASE}?mode=ro", uri=True)
        for line in conn.iterdump():
            digest.update(line.encode())
        conn.close()
    except sqlite3.DatabaseError:
        return "unreadable"
    digest.update((path / VECTORS).read_bytes())
    return digest.hexdigest()


def flips(clean: Path, name: str, n: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    original = content(clean)
    found = harmless = 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(n):
            copy = Path(tmp) / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(clean, copy)
            data = bytearray((copy / name).read_bytes())
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
            (copy / name).write_bytes(bytes(data))
            if not verify_store(copy).ok:
                found += 1
            elif content(copy) == original:
                harmless += 1
    return {
        "flips": n,
        "found": found,
        "not_found_nothing_changed": harmless,
        "not_found_content_changed": n - found - harmless,
    }


def checked_reads(path: Path) -> dict[str, float]:
    """Seconds of the reads a predict makes on open (label and statistics rows, all vectors),
    without checks and with them (cold: no block checked before), and the checks' share."""
    seconds = {}
    for check in (False, True):
        VERIFIED_BLOCKS.clear()
        store = Store.open(path, read_only=True, check=False)
        store.check_reads = check
        checks_before = READ_CHECKS.seconds
        start = time.perf_counter()
        store.load_statistics()
        store.load_vectors()
        seconds["checked" if check else "unchecked"] = time.perf_counter() - start
        store.close()
    seconds["checks"] = READ_CHECKS.seconds - checks_before
    return {key: round(value, 3) for key, value in seconds.items()}


def timed_predict(args: argparse.Namespace, store: Path, output: Path, cold: bool) -> dict:
    """One ``icl-cl predict`` in this process: its seconds and those of the checks on read."""
    if cold:
        VERIFIED_BLOCKS.clear()  # as in a new process
    before = dataclasses.replace(READ_CHECKS)
    argv = ["-q", "predict", "--store", str(store), "--input", args.input, "--output", str(output)]
    argv += ["--k", str(args.k), *(["--scorer", args.scorer] if args.scorer else [])]
    start = time.perf_counter()
    code = cli(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"predict failed with exit code {code}")
    checks = READ_CHECKS.seconds - before.seconds
    return {
        "blocks": "hashed" if cold else "checked before",
        "predict_seconds": round(seconds, 3),
        "check_seconds": round(checks, 4),
        "ratio": round(checks / seconds, 4),
        "blocks_hashed": READ_CHECKS.blocks_hashed - before.blocks_hashed,
        "mb_hashed": round((READ_CHECKS.bytes_hashed - before.bytes_hashed) / 1e6, 1),
        "blocks_cached": READ_CHECKS.blocks_cached - before.blocks_cached,
        "units_checked": READ_CHECKS.units - before.units,
    }


def learn_given(args: argparse.Namespace, store: Path) -> None:
    """``--train`` learned into ``store`` in one session, with its fit, from its vectors."""
    from icl_cl import ContinualClassifier
    from icl_cl.config import EmbedderConfig
    from icl_cl.embedding import load_embedder
    from icl_cl.embedding.given import GivenVectors
    from icl_cl.inputs import read_examples, read_labels

    train, _ = read_examples(args.train, max_chars=10_000)
    labels = read_labels(args.label_file)[0] if args.label_file else []
    vectors = np.load(args.train_vectors, mmap_mode="r")
    if len(vectors) != len(train):
        raise SystemExit(f"{args.train_vectors}: {len(vectors)} rows for {len(train)} examples")
    given = {ex.text: np.asarray(vectors[i]) for i, ex in enumerate(train)}
    start = time.perf_counter()
    with ContinualClassifier.open(
        store, embedder=GivenVectors(load_embedder(EmbedderConfig()), given)
    ) as clf:
        clf.learn(train, labels, k=args.k)
    print(json.dumps({"learned": len(train), "seconds": round(time.perf_counter() - start, 1)}))


def predict_cost(args: argparse.Namespace) -> None:
    """The checks on read as a share of ``icl-cl predict`` (see the module)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(args.store) if args.store else Path(tmp) / "store"
        if not args.store and args.train_vectors:
            learn_given(args, store)
        elif not args.store:
            argv = ["-q", "learn", "--store", str(store), "--data", args.train]
            if cli(argv + (["--labels", args.label_file] if args.label_file else [])) != 0:
                raise SystemExit("learn failed")
        if args.input_limit:
            lines = Path(args.input).read_text(encoding="utf-8").splitlines()[: args.input_limit]
            args.input = str(Path(tmp) / "inputs.jsonl")
            Path(args.input).write_text("\n".join(lines) + "\n", encoding="utf-8")
        sizes = {p.name: p.stat().st_size for p in store.iterdir() if p.is_file()}
        opened = Store.open(store, read_only=True, check=False)
        n_examples = opened.n_examples()
        opened.close()
        output = Path(tmp) / "predictions.jsonl"
        runs = [timed_predict(args, store, output, cold=True) for _ in range(args.repeat)]
        runs.append(timed_predict(args, store, output, cold=False))
        cold = sorted(r["ratio"] for r in runs[:-1])
        summary = {"examples": n_examples, "bytes": sizes, "input": args.input, "k": args.k}
        summary["load_average"] = [round(x, 2) for x in os.getloadavg()]
        summary["median_ratio_blocks_hashed"] = cold[len(cold) // 2]
        print(json.dumps({**summary, "runs": runs}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--labels", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--flips", type=int, default=0, help="byte flips per file (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input", help="JSONL of inputs: time the checks on read in predict")
    parser.add_argument("--store", help="with --input: the store to predict from")
    parser.add_argument("--train", help="with --input and no --store: learn this JSONL first")
    parser.add_argument("--label-file", help="with --train: label definitions (JSONL)")
    parser.add_argument("--train-vectors", help="with --train: its vectors (.npy), not embedded")
    parser.add_argument("--input-limit", type=int, default=0, help="predict the first N inputs")
    parser.add_argument("--k", type=int, default=10, help="with --input: candidates per input")
    parser.add_argument("--scorer", help="with --input: the ECL scorer (default: the store's)")
    args = parser.parse_args()
    if args.input:
        if not (args.store or args.train):
            parser.error("--input needs --store or --train")
        predict_cost(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store"
        build(path, args.vectors, args.sessions, args.labels, args.seed)
        sizes = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}
        runs = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            report = verify_store(path)
            runs.append((time.perf_counter() - start, report))
        seconds, report = min(runs, key=lambda r: r[0])
        assert report.ok, report.problems
        print(
            json.dumps(
                {
                    "vectors": args.vectors,
                    "sessions": args.sessions,
                    "labels": args.labels,
                    "bytes": sizes,
                    "seconds": round(seconds, 3),
                    "seconds_per_100k_vectors": round(seconds * 100_000 / args.vectors, 3),
                    "checks": report.to_dict()["seconds"],
                    "reads_on_open": checked_reads(path),
                }
            )
        )
        if args.flips:
            for name in (VECTORS, DATABASE):
                print(json.dumps({"file": name, **flips(path, name, args.flips, args.seed)}))


if __name__ == "__main__":
    main()
