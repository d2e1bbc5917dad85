"""Throughput and latency of ``icl-cl serve`` against the CLI's batch predict, on the same items.

ECL only (``no_llm``), the shipped WordNet sample: the store learns its 240 training examples
(``icl-cl learn``), the items are its 96 test texts repeated to ``--items``. Then, in one run:

1. the CLI: ``icl-cl predict --no-llm`` on all items as one file (the whole command, with its
   start-up), and the predict call it makes, in-process and warmed up (``cli_batch``: what the
   service is compared with);
2. the service (``icl-cl serve`` in its own process, 127.0.0.1): one item per request, from
   1, 8 and 32 concurrent keep-alive clients (:class:`_Connection`); throughput, p50/p95/p99
   latency, the load generator's own CPU time and the mean micro-batch size per concurrency.

The CLI call and the service runs alternate in ``--rounds`` rounds, so that both sides share
whatever else loads the machine: one run of 480 items takes about two seconds, and a 2-core
machine moves a single figure by 10-20%. Each throughput is the median of its rounds (every
round's figure is kept beside it); the latency percentiles are over the requests of all rounds.

The target: the service at concurrency 32 reaches >= 0.8x the CLI's in-process batch throughput
(micro-batching makes concurrent single-item requests one embedder call). It is reported as the
median over rounds of each round's ratio (the CLI call, then at once the service at
concurrency 32), with every round's ratio, and the ratio of the two medians, beside it.

Last, three learns of 8 examples each: the seconds from each learn's 200 to ``/readyz`` naming
its session as the one served (``learn_to_served``; a session is served before its 200), and
with ``--served-store DIR`` the same on a copy of a large store (``learn_to_served_large``).

Usage: python eval/bench/serve.py [--items 480] [--rounds 3] [--served-store DIR]
    [--out runs/bench/serve.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from icl_cl import ContinualClassifier

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "eval" / "data" / "wordnet-sample"
CLI = [sys.executable, "-m", "icl_cl.cli"]
CONCURRENCY = (1, 8, 32)


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


def cli_process(store: Path, items: list[dict[str, str]], tmp: Path) -> dict[str, Any]:
    """``icl-cl predict --no-llm`` on all items as one file: the whole command, start-up included."""
    source, out = tmp / "items.jsonl", tmp / "predictions.jsonl"
    source.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    start = time.perf_counter()
    command = ["predict", "--store", str(store), "--input", str(source), "--output", str(out)]
    subprocess.run([*CLI, *command, "--no-llm", "-q"], check=True)
    process_s = time.perf_counter() - start
    return {
        "cli_process_seconds": round(process_s, 3),
        "cli_process_items_per_s": round(len(items) / process_s, 1),
    }


class _Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads the status and body.

    The load generator shares the machine with the service it measures; httpx spends about 4 ms
    of CPU a request here, a large part of a 2-core machine at 100 requests/s. This client spends
    a fraction of that, so the figures are the service's, not the load generator's.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def _load(url: str, items: list[dict[str, str]], concurrency: int) -> dict[str, Any]:
    """One run: every item once, from ``concurrency`` clients; its throughput, the latency of
    each request, failures and the load generator's CPU seconds."""
    host, port = url.removeprefix("http://").split(":")
    bodies = [json.dumps({"inputs": [item], "no_llm": True}).encode() for item in items]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    failures = 0

    async def client() -> None:
        nonlocal failures
        connection = _Connection(host, int(port))
        try:
            while not queue.empty():
                body = queue.get_nowait()
                start = time.perf_counter()
                status, answer = await connection.post("/v1/predict", body)
                latencies.append(time.perf_counter() - start)
                failures += status != 200 or not json.loads(answer)["predictions"]
        finally:
            await connection.close()

    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {
        "items_per_s": round(len(items) / wall, 1),
        "latencies": latencies,
        "failed": failures,
        "cpu_s": time.process_time() - cpu,
    }


def _summary(concurrency: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs at one concurrency: the median throughput, the latency percentiles of all their
    requests, and the mean micro-batch size."""
    latencies = [t for run in runs for t in run["latencies"]]
    rates = [run["items_per_s"] for run in runs]
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "failed": sum(run["failed"] for run in runs),
        "items_per_s": statistics.median(rates),
        "items_per_s_rounds": rates,
        "p50_ms": round(1000 * _percentile(latencies, 50), 1),
        "p95_ms": round(1000 * _percentile(latencies, 95), 1),
        "p99_ms": round(1000 * _percentile(latencies, 99), 1),
        "mean_ms": round(1000 * statistics.fmean(latencies), 1),
        "load_generator_cpu_s_per_round": round(statistics.fmean(run["cpu_s"] for run in runs), 2),
        "mean_batch_items": round(
            sum(run["batched"][0] for run in runs) / sum(run["batched"][1] for run in runs), 1
        ),
    }


def _batches(url: str) -> tuple[float, float]:
    """Inputs classified in micro-batches so far, and the number of batches (from /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    value = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("icl_cl_predict_batch_items_")
    }
    return value["icl_cl_predict_batch_items_sum"], value["icl_cl_predict_batch_items_count"]


@contextlib.contextmanager
def running_service(store: Path, tmp: Path) -> Iterator[str]:
    """``icl-cl serve`` on ``store`` in its own process, once ready: its URL."""
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
        yield url
    finally:
        server.terminate()
        server.wait(60)


def bench(store: Path, items: list[dict[str, str]], tmp: Path, rounds: int) -> dict[str, Any]:
    """The CLI's batch predict call (in-process, warmed up) and the service at each concurrency,
    in interleaved rounds, so that both sides share whatever else loads the machine."""
    from icl_cl.classifier import ContinualClassifier

    texts = [i["text"] for i in items]
    cli_rates: list[float] = []
    runs: dict[int, list[dict[str, Any]]] = {c: [] for c in CONCURRENCY}
    with ContinualClassifier.open(store) as clf, running_service(store, tmp) as url:
        clf.predict(texts[:32], use_llm=False)  # warm-up: model and scorer loaded
        asyncio.run(_load(url, items[:64], 8))
        for _ in range(rounds):
            start = time.perf_counter()
            clf.predict(texts, use_llm=False)
            cli_rates.append(round(len(items) / (time.perf_counter() - start), 1))
            # Concurrency 32 right after the CLI call: the pair the target compares, seconds apart.
            for concurrency in sorted(CONCURRENCY, reverse=True):
                before = _batches(url)
                run = asyncio.run(_load(url, items, concurrency))
                after = _batches(url)
                run["batched"] = (after[0] - before[0], after[1] - before[1])
                runs[concurrency].append(run)
    return {
        "cli_batch_items_per_s": statistics.median(cli_rates),
        "cli_batch_items_per_s_rounds": cli_rates,
        "service": [_summary(c, runs[c]) for c in CONCURRENCY],
    }


def learn_to_served(store: Path, tmp: Path, sessions: int = 3) -> dict[str, Any]:
    """Seconds from a learn's 200 to ``/readyz`` naming its session as the one served, and the
    learn request's own seconds, for ``sessions`` learns of 8 new examples each."""
    rows = [json.loads(line) for line in (SAMPLE / "test.jsonl").read_text().splitlines()]
    acked, served = [], []
    with running_service(store, tmp) as url:
        for t in range(sessions):
            batch = [
                {"id": f"served-{t}-{i}", "text": r["text"], "labels": r["labels"]}
                for i, r in enumerate(rows[8 * t : 8 * (t + 1)])
            ]
            start = time.perf_counter()
            answer = httpx.post(f"{url}/v1/learn", json={"examples": batch}, timeout=300)
            answer.raise_for_status()
            ack = time.perf_counter()
            while (
                httpx.get(f"{url}/readyz", timeout=30).json()["serving_session"]
                != answer.json()["session"]
            ):
                if time.perf_counter() - ack > 300:
                    raise RuntimeError("the session was not served within 300 s")
                time.sleep(0.01)
            acked.append(round(ack - start, 3))
            served.append(round(time.perf_counter() - ack, 3))
    return {"learn_request_s": acked, "served_after_200_s": served}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=480)
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per figure (median)")
    parser.add_argument("--out", default="runs/bench/serve.json")
    parser.add_argument(
        "--served-store",
        help="also measure learn_to_served on a copy of this store (a large WordNet supersenses "
        "store, e.g. the 20,000-example base that eval/bench/shutdown.py --base keeps)",
    )
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    items = _items(args.items)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        store = tmp / "store"
        learn = ["learn", "--store", str(store), "--data", str(SAMPLE / "train.jsonl")]
        subprocess.run([*CLI, *learn, "--labels", str(SAMPLE / "labels.jsonl"), "-q"], check=True)
        process = cli_process(store, items, tmp)
        measured = bench(store, items, tmp, args.rounds)
        measured["learn_to_served"] = learn_to_served(store, tmp)
        if args.served_store:
            shutil.copytree(args.served_store, tmp / "large")
            with ContinualClassifier.open(tmp / "large", read_only=True) as clf:
                size = clf.memory.n_examples
            measured["learn_to_served_large"] = {
                "examples": size,
                **learn_to_served(tmp / "large", tmp),
            }
    at32 = next(row for row in measured["service"] if row["concurrency"] == 32)
    ratios = [
        round(service / cli, 3)
        for service, cli in zip(
            at32["items_per_s_rounds"], measured["cli_batch_items_per_s_rounds"], strict=True
        )
    ]
    results = {
        "store": "wordnet-sample (240 train examples, 8 labels), ECL only (mahalanobis)",
        "cpu_cores": os.cpu_count(),
        "rounds": args.rounds,
        "load_average_at_start": load_at_start,
        "items": len(items),
        **process,
        **measured,
        "service32_over_cli_batch": round(statistics.median(ratios), 2),
        "service32_over_cli_batch_rounds": ratios,
        "service32_median_over_cli_batch_median": round(
            at32["items_per_s"] / measured["cli_batch_items_per_s"], 2
        ),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
