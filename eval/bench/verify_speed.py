"""How long ``icl-cl verify`` takes per 100k vectors, and what share of random byte flips it finds.

    python eval/bench/verify_speed.py --vectors 100000 --sessions 10 --flips 100

Builds a store of ``--vectors`` random unit vectors (dim 384, as MiniLM's) with short texts and
``--labels`` single labels, learned in ``--sessions`` sessions through the store's own commit
(no embedder, so the time is the store's), then times :func:`verify_store` (each check and the
total, best of ``--repeat``). With ``--flips N``, it then flips one random byte of the vector
file N times and of the database N times, one at a time on a fresh copy, and counts the flips
verify reports; a flip it does not report is checked to have left the database's dump and the
vectors unchanged (bytes SQLite keeps no data in).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--labels", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--flips", type=int, default=0, help="byte flips per file (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
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
                }
            )
        )
        if args.flips:
            for name in (VECTORS, DATABASE):
                print(json.dumps({"file": name, **flips(path, name, args.flips, args.seed)}))


if __name__ == "__main__":
    main()
