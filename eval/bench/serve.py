"""Throughput and latency of ``icl-cl serve`` against the CLI's batch predict, on the same items.

ECL only (``no_llm``), the shipped WordNet sample: the store learns its 240 training examples
(``icl-cl learn``), the items are its 96 test texts repeated to ``--items``. Then, in one run:

1. the CLI: ``icl-cl predict --no-llm`` on all items as one file (the whole command, with its
   start-up), and the predict call it makes, in-process and warmed up (``cli_batch``: what the
   service is compared with);
2. the service (``icl-cl serve`` in its own process, 127.0.0.1): one item per request, from
   1, 8 and 32 concurrent clients; throughput and p50/p95/p99 latency per concurrency.

The target: the service at concurrency 32 reaches >= 0.8x the CLI's in-process batch throughput
(micro-batching makes concurrent single-item requests one embedder call).

Usage: python eval/bench/serve.py [--items 480] [--out runs/bench/serve.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "eval" / "data" / "wordnet-sample"
CLI = [sys.executable, "-m", "icl_cl.cli"]


def _items(n: int) -> list[dict[str, str]]:
    texts = [json.loads(line)["text"] for line in (SAMPLE / "test.jsonl").open(encoding="utf-8")]
    return [{"id": f"item-{i}", "text": texts[i % len(texts)]} for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def bench_cli(store: Path, items: list[dict[str, str]], tmp: Path) -> dict[str, Any]:
    source, out = tmp / "items.jsonl", tmp / "predictions.jsonl"
    source.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    start = time.perf_counter()
    command = ["predict", "--store", str(store), "--input", str(source), "--output", str(out)]
    subprocess.run([*CLI, *command, "--no-llm", "-q"], check=True)
    process_s = time.perf_counter() - start

    from icl_cl.classifier import ContinualClassifier

    with ContinualClassifier.open(store) as clf:
        texts = [i["text"] for i in items]
        clf.predict(texts[:32], use_llm=False)  # warm-up: model and scorer loaded
        start = time.perf_counter()
        clf.predict(texts, use_llm=False)
        batch_s = time.perf_counter() - start
    return {
        "items": len(items),
        "cli_process_seconds": round(process_s, 3),
        "cli_process_items_per_s": round(len(items) / process_s, 1),
        "cli_batch_seconds": round(batch_s, 3),
        "cli_batch_items_per_s": round(len(items) / batch_s, 1),
    }


async def _load(url: str, items: list[dict[str, str]], concurrency: int) -> dict[str, Any]:
    queue: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    latencies: list[float] = []
    failures = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures
        while not queue.empty():
            item = queue.get_nowait()
            start = time.perf_counter()
            response = await http.post(f"{url}/v1/predict", json={"inputs": [item], "no_llm": True})
            latencies.append(time.perf_counter() - start)
            failures += response.status_code != 200

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "failed": failures,
        "items_per_s": round(len(items) / wall, 1),
        "p50_ms": round(1000 * _percentile(latencies, 50), 1),
        "p95_ms": round(1000 * _percentile(latencies, 95), 1),
        "p99_ms": round(1000 * _percentile(latencies, 99), 1),
        "mean_ms": round(1000 * statistics.fmean(latencies), 1),
    }


def bench_service(store: Path, items: list[dict[str, str]], tmp: Path) -> list[dict[str, Any]]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp / "serve.log").open("wb")
    server = subprocess.Popen(
        [*CLI, "serve", "--store", str(store), "--port", str(port)], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start (see {tmp / 'serve.log'})")
            time.sleep(0.2)
        asyncio.run(_load(url, items[:64], 8))  # warm-up
        return [asyncio.run(_load(url, items, c)) for c in (1, 8, 32)]
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=480)
    parser.add_argument("--out", default="runs/bench/serve.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    items = _items(args.items)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        store = tmp / "store"
        learn = ["learn", "--store", str(store), "--data", str(SAMPLE / "train.jsonl")]
        subprocess.run([*CLI, *learn, "--labels", str(SAMPLE / "labels.jsonl"), "-q"], check=True)
        cli = bench_cli(store, items, tmp)
        service = bench_service(store, items, tmp)
    at32 = next(row for row in service if row["concurrency"] == 32)
    results = {
        "store": "wordnet-sample (240 train examples, 8 labels), ECL only (mahalanobis)",
        "cpu_cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        **cli,
        "service": service,
        "service32_over_cli_batch": round(at32["items_per_s"] / cli["cli_batch_items_per_s"], 2),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
