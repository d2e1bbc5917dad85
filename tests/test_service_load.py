"""The service under load and faults (ECL only, the shipped WordNet sample):

* 20 learn sessions while 8 clients predict: no predict fails, and each answer is exactly the
  answer of the state after some session (checked against snapshots made with the library),
  the session its ``ICL-CL-Session`` header names;
* 10 SIGKILLs at random moments during learns under load, each followed by a restart: every
  acknowledged session is in the store once (clients retry with their idempotency key), and
  the store always opens;
* SIGTERM drains the requests in flight and exits cleanly.
"""

from __future__ import annotations

import random
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from icl_cl.classifier import ContinualClassifier
from icl_cl.client import Client
from icl_cl.config import ClassifierConfig, MemoryConfig
from icl_cl.describe import PredictionRow
from icl_cl.service.app import SESSION_HEADER, create_app
from tests.service_helpers import (
    as_json,
    free_port,
    learned_store,
    running,
    start_cli,
    wait_healthy,
    wait_ready,
)

pytestmark = pytest.mark.slow

BASE = 80  # examples of the first session; the rest of the 240 come in 20 sessions of 8
SESSIONS = 20


def _predicting(
    url: str, body: Any, stop: threading.Event, answers: list[Any], errors: list[Any]
) -> None:
    """One client: predicts until ``stop`` (bounded: 2,000 requests)."""
    with httpx.Client(timeout=60) as http:
        for _ in range(2000):
            if stop.is_set():
                return
            try:
                response = http.post(f"{url}/v1/predict", json=body)
            except httpx.TransportError as exc:
                errors.append(repr(exc))
                continue
            if response.status_code != 200:
                errors.append((response.status_code, response.text))
            else:
                answers.append((int(response.headers[SESSION_HEADER]), response.json()))


def test_learning_under_load_serves_the_state_before_or_after_each_session(
    tmp_path: Path, embedder: Any, wordnet: Any
) -> None:
    train, test, labels = wordnet
    sessions = [train[BASE + 8 * i : BASE + 8 * (i + 1)] for i in range(SESSIONS)]
    probes = [{"id": ex.id, "text": ex.text} for ex in test[:6]]
    # A fixed scorer: the state alone then ranks the candidates (auto's choice is made again as
    # the store doubles, by the refit, while the session is served at once).
    config = ClassifierConfig(memory=MemoryConfig(scorer="mahalanobis"))
    base = learned_store(tmp_path / "base", embedder, train[:BASE], labels, config=config)
    shutil.copytree(base, tmp_path / "served")
    stop, answers, errors = threading.Event(), [], []
    with running(create_app(tmp_path / "served", embedder=embedder)) as url:
        clients = [
            threading.Thread(
                target=_predicting, args=(url, {"inputs": probes}, stop, answers, errors)
            )
            for _ in range(8)
        ]
        for client in clients:
            client.start()
        try:
            with Client(url, retries=5) as learner:
                for i, session in enumerate(sessions):
                    assert learner.learn(as_json(session))["session"] == i + 2
            deadline = time.monotonic() + 120
            while httpx.get(f"{url}/readyz").json()["serving_session"] != SESSIONS + 1:
                assert time.monotonic() < deadline, "the last refit was not served in time"
                time.sleep(0.1)
            time.sleep(0.5)  # a few answers from the last state too
        finally:
            stop.set()
            for client in clients:
                client.join(120)
    assert not errors
    assert len(answers) >= 8 * 5
    seen = {session for session, _body in answers}
    assert SESSIONS + 1 in seen and len(seen) >= 3
    # The snapshots: the answers of each state that served, made with the library. A session
    # is served as soon as it is learned, with the heads of an earlier fit until its own are
    # fitted: the state decides the labels and the candidates with their order; the heads'
    # calibration only moves the probabilities.
    expected: dict[int, list[dict[str, Any]]] = {}
    with ContinualClassifier.open(base, embedder=embedder) as clf:
        for session in range(1, SESSIONS + 2):
            if session > 1:
                clf.learn(sessions[session - 2], fit=False)
            if session in seen:
                clf.fit(10, use_llm=False)
                predictions = clf.predict([p["text"] for p in probes], use_llm=False)
                expected[session] = [
                    PredictionRow.of(p["id"], pred).model_dump(mode="json")
                    for p, pred in zip(probes, predictions, strict=True)
                ]
    for session, body in answers:
        for got, want in zip(body["predictions"], expected[session], strict=True):
            assert got["labels"] == want["labels"], (session, got, want)
            order = sorted(want["scores"], key=want["scores"].get, reverse=True)
            assert sorted(got["scores"], key=got["scores"].get, reverse=True) == order, session


def test_sigkill_during_learns_loses_no_acknowledged_session(
    tmp_path: Path, embedder: Any, wordnet: Any
) -> None:
    train, test, labels = wordnet
    store = learned_store(tmp_path / "store", embedder, train[:BASE], labels)
    key = "kill-test-write-key-0123"
    (tmp_path / "keys").write_text(f"{key} write\n", encoding="utf-8")
    log, rng = tmp_path / "server.log", random.Random(16)
    sessions = [train[BASE + 8 * i : BASE + 8 * (i + 1)] for i in range(10)]
    acknowledged: dict[int, dict[str, int]] = {}
    probes = {"inputs": [{"id": ex.id, "text": ex.text} for ex in test[:4]]}
    for i, session in enumerate(sessions):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_cli(store, port, log, "--api-key-file", str(tmp_path / "keys"))
        try:
            wait_healthy(url, server)
            with Client(url, key, retries=0) as client:
                # The restarted server serves at once (from its last state), before any learn.
                assert len(client.predict([ex.text for ex in test[:2]])) == 2
                if i - 1 >= 0 and i - 1 not in acknowledged:  # the client retries, same key
                    acknowledged[i - 1] = client.learn(
                        as_json(sessions[i - 1]), idempotency_key=f"session-{i - 1}"
                    )
                stop = threading.Event()
                load = threading.Thread(target=_load, args=(url, key, probes, stop))
                load.start()
                killer = threading.Timer(
                    rng.uniform(0.0, 1.5), server.send_signal, [signal.SIGKILL]
                )
                killer.start()
                try:
                    acknowledged[i] = client.learn(as_json(session), idempotency_key=f"session-{i}")
                except Exception:  # killed before it answered: retried after the restart
                    pass
                killer.join()
                stop.set()
                load.join(60)
        finally:
            server.kill()
            server.wait(60)
    if len(sessions) - 1 not in acknowledged:  # the last one is retried on one more server
        last = len(sessions) - 1
        acknowledged[last] = _retry(
            store, log, tmp_path / "keys", key, as_json(sessions[last]), last
        )
    with ContinualClassifier.open(store, embedder=embedder) as clf:  # the store always opens
        assert clf.memory.n_examples == BASE + 8 * len(sessions)
    with sqlite3.connect(store / "store.sqlite") as db:
        counts = dict(db.execute("SELECT session, COUNT(*) FROM examples GROUP BY session"))
        keys = dict(db.execute("SELECT key, session FROM idempotency"))
    assert counts == {1: BASE, **{s: 8 for s in range(2, 2 + len(sessions))}}
    for i, answer in acknowledged.items():
        assert keys[f"session-{i}"] == answer["session"]
        assert answer["examples"] == 8
    assert key not in log.read_text(encoding="utf-8")  # no secrets in logs


def _retry(store: Path, log: Path, keys: Path, key: str, examples: Any, i: int) -> dict[str, int]:
    """Restart the server and learn ``examples`` again with the idempotency key of session ``i``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_cli(store, port, log, "--api-key-file", str(keys))
    try:
        wait_healthy(url, server)
        with Client(url, key, retries=5) as client:
            return client.learn(examples, idempotency_key=f"session-{i}")
    finally:
        server.terminate()
        server.wait(60)


def _load(url: str, key: str, body: Any, stop: threading.Event) -> None:
    """Predicts until ``stop`` or the server dies (bounded: 500 requests)."""
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {key}"}) as http:
        for _ in range(500):
            if stop.is_set():
                return
            try:
                http.post(f"{url}/v1/predict", json=body)
            except httpx.TransportError:
                return


def test_sigterm_drains_requests_in_flight_and_exits_cleanly(
    tmp_path: Path, embedder: Any, wordnet: Any
) -> None:
    train, test, labels = wordnet
    store = learned_store(tmp_path / "store", embedder, train[:BASE], labels)
    port, log = free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    server = start_cli(store, port, log, "--batch-wait-ms", "300")
    try:
        wait_healthy(url, server)
        # Ready: the models are loaded, so the predict below waits in its micro-batch (not
        # behind the start-up's loading) when the signal comes.
        wait_ready(url)
        body = {"inputs": [{"id": ex.id, "text": ex.text} for ex in test[:32]]}
        answers: list[httpx.Response] = []
        request = threading.Thread(
            target=lambda: answers.append(httpx.post(f"{url}/v1/predict", json=body, timeout=60))
        )
        request.start()
        time.sleep(0.1)  # the predict is waiting in its micro-batch
        server.send_signal(signal.SIGTERM)
        request.join(60)
        # uvicorn ends a drained shutdown by raising the signal again, so that the status says it.
        assert server.wait(60) == -signal.SIGTERM
    finally:
        server.kill()
    assert answers and answers[0].status_code == 200
    assert len(answers[0].json()["predictions"]) == 32
    text = log.read_text(encoding="utf-8")
    assert "no --api-key-file" in text and "loopback only" in text
    assert "Application shutdown complete" in text


def test_serve_refuses_a_public_address_without_keys(tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "server.log"
    server = start_cli(tmp_path / "store", port, log, "--host", "0.0.0.0")
    assert server.wait(120) == 3  # a config error
    assert "refusing to serve on 0.0.0.0 without --api-key-file" in log.read_text(encoding="utf-8")
    assert not (tmp_path / "store").exists()
