"""The service's edge against a real uvicorn on 127.0.0.1: values no field may hold (lone
surrogates, NaN and infinities) get 422 naming the field on a connection that stays usable,
the schema and the server agree on what is valid, and slow clients are disconnected."""

from __future__ import annotations

import http.client
import json
import logging
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from icl_cl.service.app import create_app
from icl_cl.service.settings import ServiceSettings
from tests.service_helpers import free_port, learned_store, running, start_cli, wait_healthy

SETTINGS = ServiceSettings(max_items=8, max_k=20, read_timeout_s=1.0, keep_alive_s=5.0)
TEXT = {"id": "a", "text": "a small dog"}
EXAMPLE = {"id": "new-1", "text": "a grey wolf", "labels": ["noun.animal"]}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, embedder: Any, wordnet: Any) -> Iterator[Any]:
    """A service over a store that learned 80 sample examples, and the log records of its
    server and of icl_cl: (url, records)."""
    train, _test, labels = wordnet
    store = learned_store(tmp_path_factory.mktemp("edge") / "store", embedder, train[:80], labels)
    records = _Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "icl_cl")]
    for logger in loggers:
        logger.addHandler(records)
    try:
        with running(create_app(store, settings=SETTINGS, embedder=embedder)) as url:
            yield url, records
    finally:
        for logger in loggers:
            logger.removeHandler(records)


def _raw(body: str) -> bytes:
    """A JSON text as written (``\\ud800`` escapes and ``NaN`` literals stay as they are)."""
    return body.encode("ascii")


BAD = [
    ('{"inputs": [{"id": "a", "text": "cat \\ud800"}]}', "/v1/predict", ["inputs", 0, "text"]),
    ('{"inputs": [{"id": "\\udfff", "text": "cat"}]}', "/v1/predict", ["inputs", 0, "id"]),
    ('{"inputs": [{"id": "a", "text": "cat"}], "scorer": "\\ud800"}', "/v1/predict", ["scorer"]),
    (
        '{"inputs": [{"id": "a", "text": "cat"}], "abstain_below": NaN}',
        "/v1/predict",
        ["abstain_below"],
    ),
    (
        '{"inputs": [{"id": "a", "text": "cat"}], "confidence": Infinity}',
        "/v1/predict",
        ["confidence"],
    ),
    (
        '{"inputs": [{"id": "a", "text": "cat"}], "threshold": -Infinity}',
        "/v1/predict",
        ["threshold"],
    ),
    ('{"inputs": [{"id": "a", "text": "cat"}], "k": 1e999}', "/v1/predict", ["k"]),
    ('{"inputs": [{"id": "a", "text": "cat"}], "\\ud800": 1}', "/v1/predict", ["\\ud800"]),
    (
        '{"examples": [{"id": "x", "text": "t \\ud83d", "labels": ["noun.animal"]}]}',
        "/v1/learn",
        ["examples", 0, "text"],
    ),
    (
        '{"examples": [{"id": "x", "text": "t", "labels": ["noun.\\ud800"]}]}',
        "/v1/learn",
        ["examples", 0, "labels", 0],
    ),
    ('{"labels": [{"label": "noun.x", "name": "\\udc00"}]}', "/v1/learn", ["labels", 0, "name"]),
    ('{"labels": [{"label": "noun.x", "group": NaN}]}', "/v1/learn", ["labels", 0, "group"]),
]


@pytest.mark.parametrize(("body", "path", "loc"), BAD)
def test_surrogates_and_non_finite_numbers_get_422_and_the_connection_serves_on(
    served: Any, body: str, path: str, loc: list[Any]
) -> None:
    url, records = served
    before = len(records.records)
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    headers = {"content-type": "application/json"}
    try:
        connection.request("POST", path, _raw(body), headers)
        answer = connection.getresponse()
        detail = json.loads(answer.read())["detail"]
        assert answer.status == 422, detail
        assert detail[0]["loc"] == ["body", *loc]
        socket_used = connection.sock
        connection.request("POST", "/v1/predict", json.dumps({"inputs": [TEXT]}), headers)
        good = connection.getresponse()
        assert good.status == 200, good.read()
        good.read()
        assert connection.sock is socket_used  # the same keep-alive connection
    finally:
        connection.close()
    logged = records.records[before:]
    assert not [r for r in logged if r.levelno >= logging.ERROR or r.exc_info], logged


def test_a_text_with_a_surrogate_pair_is_a_character_and_is_served(served: Any) -> None:
    url, _ = served
    body = _raw('{"inputs": [{"id": "a", "text": "a dog \\ud83d\\udc15"}]}')
    headers = {"content-type": "application/json"}
    answer = httpx.post(f"{url}/v1/predict", content=body, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text


def test_a_body_that_is_not_text_gets_the_declared_400(served: Any) -> None:
    url, _ = served
    headers = {"content-type": "application/json"}
    not_text = b'{"inputs": [{"id": "a", "text": "\xff"}]}'  # no UTF-8, -16 or -32 text
    answer = httpx.post(f"{url}/v1/predict", content=not_text, headers=headers)
    assert answer.status_code == 400
    assert isinstance(answer.json()["detail"], str)
    schema = httpx.get(f"{url}/openapi.json").json()
    for path in ("/v1/predict", "/v1/learn"):
        assert "400" in schema["paths"][path]["post"]["responses"], path
    # A surrogate written in UTF-8 (which UTF-8 forbids) is read as one, and refused as one.
    encoded = b'{"inputs": [{"id": "a", "text": "\xed\xa0\x80"}]}'
    answer = httpx.post(f"{url}/v1/predict", content=encoded, headers=headers)
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["body", "inputs", 0, "text"]


# ---- the schema and the server agree -----------------------------------------------------------


def _validator(schema: dict[str, Any], path: str) -> jsonschema.Validator:
    body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    resolved = {**body, "components": schema["components"]}
    return jsonschema.Draft202012Validator(resolved)


AGREE = [
    ("/v1/predict", {"inputs": [TEXT]}),
    ("/v1/predict", {"inputs": [{"id": "a"}]}),
    ("/v1/predict", {"inputs": [{"id": "a", "text": None}]}),
    ("/v1/predict", {"inputs": [{"id": "a", "text": None, "image": None}]}),
    ("/v1/predict", {"inputs": [{"id": "a", "text": "x", "image": "data:,"}]}),
    ("/v1/predict", {"inputs": [{"id": "a", "text": "x", "image": None}]}),
    ("/v1/predict", {"inputs": [{"id": "a", "text": " \t"}]}),
    ("/v1/predict", {"inputs": [{"id": str(i), "text": "x"} for i in range(9)]}),
    ("/v1/predict", {"inputs": [TEXT], "k": 20}),
    ("/v1/predict", {"inputs": [TEXT], "k": 21}),
    ("/v1/predict", {"inputs": [TEXT], "decision": "threshold", "threshold": 0.3}),
    ("/v1/predict", {"inputs": [TEXT], "threshold": 0.3}),
    ("/v1/predict", {"inputs": [TEXT], "decision": "cardinality", "threshold": 0.3}),
    ("/v1/predict", {"inputs": [TEXT], "decision": "cardinality", "threshold": None}),
    ("/v1/predict", {"inputs": [TEXT], "confidence": 1e-300}),  # 1 - confidence == 1.0
    ("/v1/predict", {"inputs": [TEXT], "confidence": 0.9}),
    ("/v1/predict", {"inputs": [{"id": "a", "image": "data:image/png;base64,AAAA"}]}),
    ("/v1/learn", {"examples": [], "labels": []}),
    ("/v1/learn", {}),
    ("/v1/learn", {"examples": [{**EXAMPLE, "text": "  "}]}),
    ("/v1/learn", {"examples": [{**EXAMPLE, "labels": [" "]}]}),
    ("/v1/learn", {"examples": [{**EXAMPLE, "id": "\n"}]}),
    ("/v1/learn", {"labels": [{"label": ""}]}),
    ("/v1/learn", {"labels": [{"label": "noun.edge", "name": "edge"}]}),
]


def test_the_schema_allows_a_request_exactly_when_the_server_takes_it(served: Any) -> None:
    """Each request is valid by ``/openapi.json`` exactly when the server does not refuse it
    with 422 (the cases schemathesis found: an empty session, an input with neither text nor
    image; and blank strings, the limits, the threshold rule)."""
    url, _ = served
    schema = httpx.get(f"{url}/openapi.json").json()
    for path, body in AGREE:
        valid = _validator(schema, path).is_valid(body)
        answer = httpx.post(url + path, json=body, timeout=60)
        assert answer.status_code < 500, (path, body, answer.text)
        assert valid == (answer.status_code != 422), (path, body, answer.status_code, answer.text)


# ---- slow clients ----------------------------------------------------------------------------------


def _closed(sock: socket.socket, limit: float) -> bool:
    """Whether the server closes ``sock`` within ``limit`` seconds (it may answer first)."""
    deadline = time.monotonic() + limit
    try:
        for _ in range(1000):  # a closed connection reads b""; each read waits at most limit
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            if not sock.recv(4096):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connected, nothing sent
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n",  # half the headers
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"inputs": [{"id"',  # half the body
    ],
    ids=["nothing", "half-headers", "half-body"],
)
def test_a_client_that_stalls_is_disconnected_within_the_read_timeout(
    served: Any, sent: bytes
) -> None:
    url, _ = served
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as stalled:
        start = time.monotonic()
        stalled.sendall(sent)
        served_meanwhile = httpx.post(f"{url}/v1/predict", json={"inputs": [TEXT]}, timeout=60)
        closed = _closed(stalled, limit=SETTINGS.read_timeout_s + 2.0)
        closed_after = time.monotonic() - start
    logging.getLogger(__name__).warning("stalled connection closed after %.2fs", closed_after)
    assert served_meanwhile.status_code == 200
    assert closed, "the stalled connection was still open"
    assert SETTINGS.read_timeout_s * 0.8 <= closed_after < SETTINGS.read_timeout_s + 2.0


def test_a_slow_but_whole_request_within_the_timeout_is_answered(served: Any) -> None:
    url, _ = served
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"inputs": [TEXT]}).encode()
    head = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        for part in (head, body[:10], body[10:]):
            sock.sendall(part)
            time.sleep(SETTINGS.read_timeout_s / 4)
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_read_timeouts_are_settings() -> None:
    from icl_cl.service.server import uvicorn_options

    options = uvicorn_options(ServiceSettings(read_timeout_s=7.5, keep_alive_s=3.0))
    assert options["timeout_keep_alive"] == 3.0
    assert getattr(options["http"], "timeout", None) == 7.5


def test_serve_flags_set_the_read_and_keep_alive_timeouts(tmp_path: Path) -> None:
    """``icl-cl serve --read-timeout 1 --keep-alive 1``: a connection with half its headers,
    and an idle one after a whole request, are closed after about 1 s, not after the defaults
    (30 s and 5 s)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    server = start_cli(tmp_path / "store", port, log, "--read-timeout", "1", "--keep-alive", "1")
    try:
        wait_healthy(url, server)
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            start = time.monotonic()
            stalled.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            assert _closed(stalled, limit=4.0), log.read_text()
            read_closed = time.monotonic() - start
        with socket.create_connection(("127.0.0.1", port)) as idle:
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            idle.settimeout(30)
            assert idle.recv(4096).startswith(b"HTTP/1.1 200")
            start = time.monotonic()
            assert _closed(idle, limit=4.0), log.read_text()
            idle_closed = time.monotonic() - start
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(30)
    assert 0.8 <= read_closed < 4.0 and 0.8 <= idle_closed < 4.0, (read_closed, idle_closed)
