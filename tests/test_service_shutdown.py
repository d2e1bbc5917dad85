"""Prompt shutdown: SIGTERM to a real ``icl-cl serve`` while a background refit runs ends the
process within 10 s, the store keeps every committed session and verifies, and a restart
serves at once.

The refit is made long the way it is in production when an LLM stalls: the configured LLM
server accepts connections and never answers (a listening socket nobody accepts on), so a
refit that reads held-out items with it cannot finish by itself.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from icl_cl.cli import main
from icl_cl.service.app import SESSION_HEADER
from tests.service_helpers import as_json, free_port, learned_store, start_cli, wait_healthy

EXIT_WITHIN_S = 10.0
logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _llm_that_never_answers() -> Iterator[int]:
    """A port where connections are taken (by the kernel's backlog) and never answered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])


def _metric(url: str, name: str) -> float | None:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_during_a_refit_exits_within_10s_and_loses_nothing(
    tmp_path: Path, embedder: Any, wordnet: Any
) -> None:
    train, test, labels = wordnet
    store = learned_store(tmp_path / "store", embedder, train[:60], labels)
    log = tmp_path / "serve.log"
    with _llm_that_never_answers() as llm_port:
        config = tmp_path / "llm.yaml"
        config.write_text(
            "llm:\n  backend: openai\n  model: m\n  options:\n"
            f"    base_url: http://127.0.0.1:{llm_port}/v1\n    timeout: 300\n"
            "    max_retries: 0\n",
            encoding="utf-8",
        )
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_cli(store, port, log, "--config", str(config))
        try:
            wait_healthy(url, server)
            learned = httpx.post(
                f"{url}/v1/learn", json={"examples": as_json(train[60:68])}, timeout=120
            )
            assert learned.status_code == 200, learned.text
            assert learned.json()["session"] == 2
            # The refit of session 2 reads held-out items with the LLM: it is stuck there.
            _wait(lambda: _metric(url, "icl_cl_refit_running") == 1.0, 60, "a refit to run")
            time.sleep(1.0)
            assert _metric(url, "icl_cl_refit_running") == 1.0
            start = time.monotonic()
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=120)
            seconds = time.monotonic() - start
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(30)
    text = log.read_text(encoding="utf-8")
    logger.warning("exit %.2fs after SIGTERM, a refit running", seconds)
    assert seconds < EXIT_WITHIN_S, f"exit took {seconds:.1f}s\n{text[-3000:]}"
    assert code in (-signal.SIGTERM, 0), text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert main(["verify", "--store", str(store), "-q"]) == 0
    _restart_serves_session_2(store, tmp_path, test)


def _restart_serves_session_2(store: Path, tmp_path: Path, test: Any) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_cli(store, port, tmp_path / "restart.log")  # the ECL alone this time
    try:
        wait_healthy(url, server)
        answer = httpx.post(
            f"{url}/v1/predict", json={"inputs": [{"id": "a", "text": test[0].text}]}, timeout=120
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers[SESSION_HEADER] == "2"
        info = httpx.get(f"{url}/v1/info", timeout=30).json()
        assert info["examples"] == 68
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            pytest.fail("the restarted server did not stop on SIGTERM")
