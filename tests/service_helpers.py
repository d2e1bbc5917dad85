"""Helpers of the service tests: a real uvicorn on 127.0.0.1 (in a thread, or the CLI in a
process), a free port, and stores learned from the shipped WordNet sample."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from icl_cl.classifier import ContinualClassifier
from icl_cl.service.server import uvicorn_options
from icl_cl.types import Example, Label

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(app: Any, timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1 in a thread, with the timeouts ``icl-cl serve``
    sets; yields its URL; stops it after."""
    port = free_port()
    options = uvicorn_options(app.state.settings) if hasattr(app.state, "settings") else {}
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def learned_store(
    path: Path,
    embedder: Any,
    examples: Sequence[Example],
    labels: Sequence[Label],
    k: int = 10,
    config: Any = None,
) -> Path:
    """A store at ``path`` (created with ``config``) that learned ``examples`` in one session,
    with heads fitted (ECL)."""
    with ContinualClassifier.open(path, config, embedder=embedder) as clf:
        clf.learn(examples, labels, fit=False)
        clf.fit(k, use_llm=False)
    return path


def as_json(examples: Sequence[Example]) -> list[dict[str, Any]]:
    return [{"id": ex.id, "text": ex.text, "labels": list(ex.labels)} for ex in examples]


def label_json(labels: Sequence[Label]) -> list[dict[str, Any]]:
    return [
        {"label": lab.label, "name": lab.name, "description": lab.description, "group": lab.group}
        for lab in labels
    ]


def start_cli(store: Path, port: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``icl-cl serve`` in a process of its own (its log to ``log``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "icl_cl.cli", "serve", "--store", str(store)]
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*command, "--port", str(port), *extra], stdout=out, stderr=subprocess.STDOUT, env=env
        )


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    """Wait (bounded) until ``/healthz`` answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("the server did not answer /healthz in time")


def wait_ready(url: str, headers: dict[str, str] | None = None, timeout: float = 120.0) -> None:
    """Wait (bounded) until ``/readyz`` answers 200: the models are loaded at start in the
    background, and a learned store's heads are fitted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/readyz", headers=headers, timeout=30).status_code == 200:
            return
        time.sleep(0.05)
    raise RuntimeError("the service was not ready in time")
