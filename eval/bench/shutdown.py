"""SIGTERM to ``icl-cl serve`` while a background refit runs, on a 20,000-example store: how
long the process takes to exit, whether the store verifies after, and how soon a restart serves.

The store: ``--size`` items of WordNet supersenses' train (a fixed shuffle, so that every label
is in it), learned and fitted through the public API with their vectors from ``--vectors`` (a
``.npy`` aligned with the train file), so building it embeds nothing. Then, in one run:

1. ``icl-cl serve`` on it, in its own process on 127.0.0.1, with the real embedder;
2. a ``POST /v1/learn`` of ``--session`` other train items (more than a tenth of the store, so
   that the refit it starts fits the heads again, as a refit after a large session does);
3. once ``/metrics`` says a refit runs (and ``--after`` seconds more), SIGTERM: ``exit_s`` is
   the time from the signal to the process's end (the target: within 10 s); the log must say
   the refit was cancelled and hold no traceback;
4. ``icl-cl verify`` on the store, and the committed sessions (the learn's must be there);
5. a restart: the seconds to ``/healthz``, to ``/readyz`` 200 and to a predict answered 200
   from the learn's session (served at once with the last fit; the refit runs behind it).

``--base DIR`` keeps the built store there and copies it for later runs (each run changes its
copy only).

Usage:
    python eval/bench/shutdown.py --data DATASET_DIR --vectors train.npy [--size 20000]
        [--session 2100] [--after 1] [--base DIR] [--out runs/bench/shutdown.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from icl_cl import ContinualClassifier
from icl_cl.config import EmbedderConfig
from icl_cl.embedding import load_embedder
from icl_cl.embedding.given import GivenVectors
from icl_cl.inputs import read_examples, read_labels
from icl_cl.memory.verify import verify_store

CLI = [sys.executable, "-m", "icl_cl.cli"]
TIMEOUT_S = 600.0  # every wait below is bounded by this


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _until(condition: Callable[[], bool], what: str, server: subprocess.Popen[bytes]) -> float:
    """Poll ``condition`` while ``server`` runs (bounded); the seconds it took."""
    start = time.perf_counter()
    while time.perf_counter() - start < TIMEOUT_S:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}) before {what}")
        with contextlib.suppress(httpx.TransportError):
            if condition():
                return time.perf_counter() - start
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def _metric(url: str, name: str) -> float | None:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _serve(store: Path, port: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [*CLI, "serve", "--store", str(store), "--port", str(port), *extra]
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def _stop(server: subprocess.Popen[bytes]) -> float:
    """SIGTERM; the seconds to the process's end (killed after TIMEOUT_S)."""
    start = time.perf_counter()
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(30)
    return time.perf_counter() - start


def build(store: Path, data: Path, vectors: Path, size: int, session: int) -> list[Any]:
    """The base store of ``size`` items, learned and fitted unless it is there already; the
    session's items (not learned)."""
    train, _ = read_examples(data / "train.jsonl", max_chars=10_000)
    order = np.random.default_rng(0).permutation(len(train))
    if not (store / "manifest.json").exists():
        labels, _ = read_labels(data / "labels.jsonl")
        base = [train[i] for i in order[:size]]
        rows = np.load(vectors, mmap_mode="r")
        given = {train[i].text: np.asarray(rows[i]) for i in order[:size]}
        embedder = GivenVectors(load_embedder(EmbedderConfig()), given)
        with ContinualClassifier.open(store, embedder=embedder) as clf:
            clf.learn(base, labels)  # with its fit: heads stored, as a store that has served
    return [train[i] for i in order[size : size + session]]


def measure(store: Path, new: list[Any], after: float, work: Path) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "serve.log"
    # The learn embeds the session in the server: on a loaded machine longer than the default.
    extra = ["--max-items", str(len(new)), "--request-timeout", str(TIMEOUT_S)]
    server = _serve(store, port, log, *extra)
    try:
        _until(lambda: httpx.get(f"{url}/readyz", timeout=30).status_code == 200, "ready", server)
        body = {"examples": [{"id": e.id, "text": e.text, "labels": list(e.labels)} for e in new]}
        t = time.perf_counter()
        learned = httpx.post(f"{url}/v1/learn", json=body, timeout=TIMEOUT_S)
        learn_s = time.perf_counter() - t
        learned.raise_for_status()
        _until(lambda: _metric(url, "icl_cl_refit_running") == 1.0, "a refit to run", server)
        time.sleep(after)
        running = _metric(url, "icl_cl_refit_running") == 1.0
        exit_s = _stop(server)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
    text = log.read_text(encoding="utf-8", errors="replace")
    report = verify_store(store)
    with ContinualClassifier.open(store, read_only=True) as clf:
        sessions = [s.session for s in clf.memory.sessions()]
        examples = clf.memory.n_examples
    result: dict[str, Any] = {
        "learn_seconds": round(learn_s, 2),
        "session": learned.json()["session"],
        "refit_running_at_sigterm": running,
        "exit_s": round(exit_s, 2),
        "exit_code": server.returncode,
        "refit_cancelled_in_log": "cancelled: the service is closing" in text,
        "traceback_in_log": "Traceback" in text,
        "verify_ok": report.ok,
        "verify_problems": report.problems,
        "sessions": sessions,
        "examples": examples,
    }
    print(json.dumps(result), flush=True)
    result.update(restart(store, learned.json()["session"], new[0].text, work))
    return result


def restart(store: Path, session: int, text: str, work: Path) -> dict[str, Any]:
    """A new ``icl-cl serve`` on the store: the seconds to each answer, from its start."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    server = _serve(store, port, work / "restart.log")
    try:
        healthz = _until(
            lambda: httpx.get(f"{url}/healthz", timeout=30).status_code == 200, "up", server
        )
        _until(lambda: httpx.get(f"{url}/readyz", timeout=30).status_code == 200, "ready", server)
        ready = time.perf_counter() - start
        answer = httpx.post(
            f"{url}/v1/predict", json={"inputs": [{"id": "a", "text": text}]}, timeout=TIMEOUT_S
        )
        predicted = time.perf_counter() - start
        exit_s = _stop(server)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
    return {
        "restart_healthz_s": round(healthz, 2),
        "restart_ready_s": round(ready, 2),
        "restart_first_predict_s": round(predicted, 2),
        "restart_predict_status": answer.status_code,
        "restart_served_session": int(answer.headers.get("ICL-CL-Session", -1)),
        "restart_served_expected": session,
        "restart_exit_s": round(exit_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset folder (train.jsonl, labels.jsonl)")
    parser.add_argument("--vectors", required=True, help=".npy of the train file's vectors")
    parser.add_argument("--size", type=int, default=20_000, help="items in the store")
    parser.add_argument("--session", type=int, default=2_100, help="items the learn adds")
    parser.add_argument("--after", type=float, default=1.0, help="seconds into the refit")
    parser.add_argument("--base", help="keep the built store here, and reuse it")
    parser.add_argument("--out", default="runs/bench/shutdown.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = Path(args.base) if args.base else work / "base"
        t = time.perf_counter()
        new = build(base, Path(args.data), Path(args.vectors), args.size, args.session)
        build_s = time.perf_counter() - t
        shutil.copytree(base, work / "store")
        load = os.getloadavg()
        result = {"size": args.size, "build_seconds": round(build_s, 1)}
        result.update(measure(work / "store", new, args.after, work))
    result["load_average_1m"] = [round(load[0], 2), round(os.getloadavg()[0], 2)]
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
