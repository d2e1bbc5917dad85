"""Contract tests of the service: every endpoint, status code, limit and auth rule, against a
real uvicorn on 127.0.0.1 (ECL only, the shipped WordNet sample)."""

from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from icl_cl.cli import main
from icl_cl.client import Client, ServiceError
from icl_cl.config import ClassifierConfig, LLMConfig
from icl_cl.service.app import SESSION_HEADER, create_app
from icl_cl.service.auth import KeySet
from icl_cl.service.settings import ServiceSettings
from tests.service_helpers import (
    as_json,
    free_port,
    label_json,
    learned_store,
    running,
    wait_ready,
)

READ, WRITE = "read-key-0123456789", "write-key-9876543210"
SETTINGS = ServiceSettings(max_items=16, max_body_bytes=64 * 1024, max_k=20)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# service keys\n{READ} read\n{WRITE} write\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, embedder: Any, wordnet: Any, keys: Path
) -> Any:
    """A service with keys over a store that learned 200 sample examples: (url, store)."""
    train, _test, labels = wordnet
    store = learned_store(
        tmp_path_factory.mktemp("served") / "store", embedder, train[:200], labels
    )
    app = create_app(store, settings=SETTINGS, keys=KeySet.load(keys), embedder=embedder)
    with running(app) as url:
        wait_ready(url, {"Authorization": f"Bearer {READ}"})
        yield url, store


def _get(url: str, path: str, key: str | None = READ) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url + path, headers=headers, timeout=60)


def _post(url: str, path: str, body: Any, key: str | None = READ, **headers: str) -> httpx.Response:
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


def _texts(wordnet: Any, n: int) -> list[dict[str, str]]:
    return [{"id": ex.id, "text": ex.text} for ex in wordnet[1][:n]]


# ---- auth ------------------------------------------------------------------------------------


def test_every_path_but_healthz_needs_a_key(served: Any) -> None:
    url, _ = served
    assert _get(url, "/healthz", key=None).json() == {"status": "ok"}
    for path in ("/readyz", "/v1/labels", "/v1/info", "/metrics", "/openapi.json", "/docs"):
        missing = _get(url, path, key=None)
        assert missing.status_code == 401, path
        assert missing.headers["www-authenticate"] == "Bearer"
        assert _get(url, path, key="not-a-key").status_code == 401, path
        assert _get(url, path, key=READ).status_code == 200, path
    assert (
        _post(url, "/v1/predict", {"inputs": [{"id": "a", "text": "x"}]}, key=None).status_code
        == 401
    )
    wrong_scheme = httpx.get(url + "/v1/info", headers={"Authorization": f"Basic {READ}"})
    assert wrong_scheme.status_code == 401
    assert _get(url, "/v1/info", key=READ[:-1]).status_code == 401  # a prefix is not the key


def test_a_read_key_cannot_learn_and_a_write_key_can_read(served: Any, wordnet: Any) -> None:
    url, _ = served
    body = {"examples": as_json(wordnet[0][200:201])}
    refused = _post(url, "/v1/learn", body, key=READ)
    assert refused.status_code == 403
    assert "scope (read)" in refused.json()["detail"]
    assert _post(url, "/v1/predict", {"inputs": _texts(wordnet, 1)}, key=WRITE).status_code == 200


# ---- predict ---------------------------------------------------------------------------------


def test_predictions_are_the_lines_of_icl_cl_predict(
    served: Any, wordnet: Any, tmp_path: Path
) -> None:
    url, store = served
    inputs = _texts(wordnet, 12)
    answer = _post(url, "/v1/predict", {"inputs": inputs, "k": 5, "confidence": 0.9})
    assert answer.status_code == 200
    assert answer.headers[SESSION_HEADER] == "1"
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(i) + "\n" for i in inputs), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    cli = ["predict", "--store", str(store), "--input", str(source), "--output", str(out)]
    assert main([*cli, "--k", "5", "--confidence", "0.9", "--no-llm", "-q"]) == 0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    served_rows = answer.json()["predictions"]
    assert [r["id"] for r in served_rows] == [i["id"] for i in inputs]
    for row, line in zip(served_rows, lines, strict=True):
        assert row["labels"] == line["labels"] and row["set"] == line["set"]
        assert row["scores"] == pytest.approx(line["scores"], abs=1e-5)


def test_predict_options_abstain_and_decision(served: Any, wordnet: Any) -> None:
    url, _ = served
    abstaining = _post(url, "/v1/predict", {"inputs": _texts(wordnet, 3), "abstain_below": 1.0})
    assert [row["abstained"] for row in abstaining.json()["predictions"]] == [True] * 3
    assert all(row["labels"] == [] for row in abstaining.json()["predictions"])
    ruled = _post(url, "/v1/predict", {"inputs": _texts(wordnet, 2), "decision": "threshold"})
    assert ruled.status_code == 200
    bad = _post(
        url,
        "/v1/predict",
        {"inputs": _texts(wordnet, 1), "decision": "cardinality", "threshold": 0.4},
    )
    assert bad.status_code == 422


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"inputs": []}, ["body", "inputs"]),
        ({"inputs": [{"id": "a"}]}, ["body", "inputs", 0]),
        ({"inputs": [{"id": "a", "text": "x", "image": "data:,"}]}, ["body", "inputs", 0]),
        ({"inputs": [{"id": "a", "text": "   "}]}, ["body", "inputs", 0, "text"]),
        (
            {"inputs": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]},
            ["body", "inputs", 1, "id"],
        ),
        ({"inputs": [{"id": "a", "text": "x"}], "k": 0}, ["body", "k"]),
        ({"inputs": [{"id": "a", "text": "x"}], "k": 21}, ["body", "k"]),
        ({"inputs": [{"id": "a", "text": "x"}], "confidence": 1.5}, ["body", "confidence"]),
        ({"inputs": [{"id": "a", "text": "x"}], "scorer": "nope"}, ["body", "scorer"]),
        ({"inputs": [{"id": "a", "text": "x"}], "surprise": 1}, ["body", "surprise"]),
        ({"inputs": [{"id": str(i), "text": "x"} for i in range(17)]}, ["body", "inputs"]),
        ({"inputs": [{"id": "a", "image": "data:image/png;base64,AAAA"}]}, ["body", "inputs", 0]),
    ],
)
def test_bad_predict_requests_get_422_naming_the_field(
    served: Any, body: Any, loc: list[Any]
) -> None:
    url, _ = served
    answer = _post(url, "/v1/predict", body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"][: len(loc)] == loc


def test_a_text_over_max_text_chars_gets_422(
    served: Any, tmp_path: Path, embedder: Any, wordnet: Any
) -> None:
    train, _test, labels = wordnet
    store = learned_store(tmp_path / "store", embedder, train[:40], labels)
    config = ClassifierConfig(max_text_chars=300)  # a query-time setting of the stored config
    with running(create_app(store, config, settings=SETTINGS, embedder=embedder)) as url:
        answer = _post(url, "/v1/predict", {"inputs": [{"id": "a", "text": "x" * 301}]}, key=None)
        assert answer.status_code == 422
        assert answer.json()["detail"][0]["loc"] == ["body", "inputs", 0, "text"]
        assert "max_text_chars" in answer.json()["detail"][0]["msg"]
        example = {"id": "long", "text": "y" * 301, "labels": ["noun.animal"]}
        learn = _post(url, "/v1/learn", {"examples": [example]}, key=None)
        assert learn.status_code == 422
        assert learn.json()["detail"][0]["loc"] == ["body", "examples", 0, "text"]


def test_a_body_over_the_limit_gets_413(served: Any) -> None:
    url, _ = served
    big = {"inputs": [{"id": "a", "text": "word " * 20_000}]}
    assert _post(url, "/v1/predict", big).status_code == 413
    chunked = httpx.post(
        url + "/v1/predict",
        content=iter([b'{"inputs": [{"id": "a", "text": "', b"w" * 70_000, b'"}]}']),
        headers={"Authorization": f"Bearer {READ}", "content-type": "application/json"},
    )
    assert chunked.status_code == 413


def test_a_full_queue_gets_429_with_retry_after(
    tmp_path: Path, embedder: Any, wordnet: Any
) -> None:
    train, test, labels = wordnet
    store = learned_store(tmp_path / "store", embedder, train[:80], labels)
    settings = ServiceSettings(max_queue_items=2, batch_wait_ms=200, max_batch_items=1)
    with running(create_app(store, settings=settings, embedder=embedder)) as url:
        body = {"inputs": [{"id": "a", "text": test[0].text}]}
        # Enough callers at once that more than two wait while one is predicted, however fast
        # the machine (with 12, an idle machine once answered every one in time).
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda _: _post(url, "/v1/predict", body, key=None), range(32)))
    statuses = sorted(a.status_code for a in answers)
    assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}
    assert all(a.headers["retry-after"] == "1" for a in answers if a.status_code == 429)


def test_a_request_past_its_timeout_gets_503(tmp_path: Path, embedder: Any, wordnet: Any) -> None:
    train, test, labels = wordnet
    store = learned_store(tmp_path / "store", embedder, train[:80], labels)
    settings = ServiceSettings(request_timeout_s=0.001, batch_wait_ms=50)
    with running(create_app(store, settings=settings, embedder=embedder)) as url:
        answer = _post(
            url, "/v1/predict", {"inputs": [{"id": "a", "text": test[0].text}]}, key=None
        )
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "1"


# ---- learn -----------------------------------------------------------------------------------


def test_learn_appends_a_session_and_an_idempotency_key_never_learns_twice(
    served: Any, wordnet: Any
) -> None:
    url, _ = served
    body = {"examples": as_json(wordnet[0][200:210])}
    first = _post(url, "/v1/learn", body, key=WRITE, **{"Idempotency-Key": "session-a"})
    assert first.status_code == 200
    assert first.json() == {"session": 2, "examples": 10, "new_labels": 0}
    again = _post(url, "/v1/learn", body, key=WRITE, **{"Idempotency-Key": "session-a"})
    assert again.json() == first.json()
    other = {"examples": as_json(wordnet[0][210:212])}
    reused = _post(url, "/v1/learn", other, key=WRITE, **{"Idempotency-Key": "session-a"})
    assert reused.status_code == 422
    assert reused.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    # Served as soon as it is acknowledged, before its heads are fitted again.
    info = _get(url, "/v1/info").json()
    assert (info["examples"], info["serving_session"]) == (210, 2)
    assert _get(url, "/readyz").json()["serving_session"] == 2
    assert (info["examples"], info["serving_session"], len(info["sessions"])) == (210, 2, 2)
    predicted = _post(url, "/v1/predict", {"inputs": _texts(wordnet, 1)})
    assert predicted.headers[SESSION_HEADER] == "2"


def test_learn_is_all_or_nothing_and_errors_name_the_item(served: Any, wordnet: Any) -> None:
    url, _ = served
    before = _get(url, "/v1/info").json()["examples"]
    good = as_json(wordnet[0][212:214])
    cases = [
        (
            [*good, {"id": "x1", "text": "a thing", "labels": [" "]}],
            ["body", "examples", 2, "labels"],
        ),
        ([*good, {**good[0], "id": good[1]["id"]}], ["body", "examples", 1, "id"]),
        (
            [*good, {"id": "x2", "text": "", "labels": ["noun.animal"]}],
            ["body", "examples", 2, "text"],
        ),
        ([*good, {"id": "x3", "labels": ["noun.animal"]}], ["body", "examples", 2, "text"]),
    ]
    for examples, loc in cases:
        answer = _post(url, "/v1/learn", {"examples": examples}, key=WRITE)
        assert answer.status_code == 422, answer.text
        assert answer.json()["detail"][0]["loc"][: len(loc)] == loc, answer.text
    stored = [*good, as_json(wordnet[0][:1])[0]]  # an id the store holds: a conflict, 409
    answer = _post(url, "/v1/learn", {"examples": stored}, key=WRITE)
    assert answer.status_code == 409, answer.text
    assert answer.json()["detail"][0]["loc"] == ["body", "examples", 2, "id"]
    too_many = _post(url, "/v1/learn", {"examples": as_json(wordnet[0][:17])}, key=WRITE)
    assert too_many.status_code == 422
    assert _get(url, "/v1/info").json()["examples"] == before


def test_new_labels_without_examples(served: Any) -> None:
    url, _ = served
    body = {"labels": [{"label": "noun.weather", "name": "weather", "description": "rain, snow"}]}
    answer = _post(url, "/v1/learn", body, key=WRITE)
    assert answer.status_code == 200 and answer.json()["new_labels"] == 1
    assert _post(url, "/v1/learn", body, key=WRITE).status_code == 409  # nothing new to learn
    other = {"labels": [{"label": "noun.weather", "name": "climate"}]}
    conflict = _post(url, "/v1/learn", other, key=WRITE)
    assert conflict.status_code == 409
    assert conflict.json()["detail"][0]["loc"] == ["body", "labels", 0, "name"]


# ---- labels, info, readiness, metrics ----------------------------------------------------------


def test_labels_info_and_readiness(served: Any, wordnet: Any) -> None:
    url, _ = served
    rows = _get(url, "/v1/labels").json()["labels"]
    assert {r["label"] for r in rows} >= {lab.label for lab in wordnet[2]}
    assert sum(r["count"] for r in rows) == _get(url, "/v1/info").json()["examples"]
    info = _get(url, "/v1/info").json()
    for field in ("examples", "labels", "embedder", "sessions", "heads", "config"):
        assert field in info
    assert _get(url, "/readyz").json()["ready"] is True


def test_metrics_count_requests_items_learns_and_refits(served: Any, wordnet: Any) -> None:
    url, _ = served
    _post(url, "/v1/predict", {"inputs": _texts(wordnet, 4)})
    text = _get(url, "/metrics").text
    metrics = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    ok = 'icl_cl_http_request_seconds_count{endpoint="/v1/predict",method="POST",status="200"}'
    assert metrics[ok] >= 1
    assert (
        metrics[
            'icl_cl_http_request_seconds_count{endpoint="/v1/predict",method="POST",status="401"}'
        ]
        >= 1
    )
    assert metrics["icl_cl_items_classified_total"] >= 4
    assert metrics["icl_cl_learn_sessions_total"] >= 1
    assert metrics["icl_cl_refit_seconds_count"] >= 1
    assert metrics["icl_cl_predict_batch_items_count"] >= 1
    assert "icl_cl_llm_calls_total" in metrics
    assert READ not in text and WRITE not in text


# ---- an empty store, the client, the LLM down ----------------------------------------------------


def test_an_empty_store_answers_409_until_a_session_is_learned(
    tmp_path: Path, embedder: Any, wordnet: Any
) -> None:
    train, test, labels = wordnet
    store = tmp_path / "new-store"
    with running(create_app(store, settings=SETTINGS, embedder=embedder)) as url:
        assert (store / "manifest.json").exists()
        client = Client(url)
        with pytest.raises(ServiceError) as empty:
            client.predict([test[0].text])
        assert empty.value.status == 409
        assert _get(url, "/readyz", key=None).status_code == 503
        answer = client.learn(as_json(train[:16]), label_json(labels))
        assert answer == {"session": 1, "examples": 16, "new_labels": 8}
        deadline = time.monotonic() + 60
        while _get(url, "/readyz", key=None).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        predictions = client.predict([test[0].text, test[1].text], k=3)
        assert [p["id"] for p in predictions] == ["0", "1"]
        assert all(p["labels"][0] in {lab.label for lab in labels} for p in predictions)


def test_with_the_llm_server_down_the_ecl_serves_and_says_so(
    tmp_path: Path, embedder: Any, wordnet: Any
) -> None:
    train, _test, labels = wordnet
    store = learned_store(tmp_path / "store", embedder, train[:80], labels)
    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    llm = LLMConfig(backend="openai", model="m", options={"base_url": closed, "max_retries": 0})
    config = ClassifierConfig(llm=llm)
    with running(create_app(store, config, settings=SETTINGS, embedder=embedder)) as url:
        answer = _post(url, "/v1/predict", {"inputs": _texts(wordnet, 2)}, key=None)
        assert answer.status_code == 200, answer.text
        for row in answer.json()["predictions"]:
            assert row["labels"] and row["llm"]["fallback"]["reason"] == "backend error"
            assert row["llm"]["fallback"]["detail"]  # the error the backend met
        # The published schema says what the server answers, the typed fallback included.
        schema = _get(url, "/openapi.json", key=None).json()
        ok = schema["paths"]["/v1/predict"]["post"]["responses"]["200"]["content"]
        resolved = {**ok["application/json"]["schema"], "components": schema["components"]}
        jsonschema.Draft202012Validator(resolved).validate(answer.json())
        ecl = _post(url, "/v1/predict", {"inputs": _texts(wordnet, 2), "no_llm": True}, key=None)
        assert "llm" not in ecl.json()["predictions"][0]
        metrics = _get(url, "/metrics", key=None).text
    assert 'icl_cl_llm_fallbacks_total{reason="backend_error"} 2.0' in metrics


def test_damage_found_while_serving_is_a_server_error_and_the_last_state_serves_on(
    tmp_path: Path, embedder: Any, wordnet: Any
) -> None:
    """A learn whose new snapshot finds the stored vectors damaged answers 500 naming the
    part (never a 4xx, never a traceback); predictions keep the state already checked."""
    train, test, labels = wordnet
    store = learned_store(tmp_path / "s", embedder, train[:40], labels)
    with running(create_app(store, settings=SETTINGS, embedder=embedder)) as url:
        wait_ready(url)
        vectors = store / "examples.f32"
        data = bytearray(vectors.read_bytes())
        data[10 * 1536 + 3] ^= 64  # a bit of row 10, in session 1's block
        vectors.write_bytes(bytes(data))
        client = Client(url)
        with pytest.raises(ServiceError) as damaged:
            client.learn(as_json(train[40:44]))
        assert damaged.value.status == 500 and "examples.f32" in str(damaged.value)
        predicted = client.predict([test[0].text], k=3)
        assert predicted and predicted[0]["labels"]
