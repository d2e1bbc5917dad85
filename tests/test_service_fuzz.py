"""Fuzzing the service from its own OpenAPI schema (schemathesis), over a store that learned the
shipped WordNet sample: no generated request may get a server error (5xx), every answer must
match the schema (status code, content type, headers, body), a request the schema allows must
not be refused as invalid (positive data acceptance), one it forbids must be (negative data
rejection), and predict must answer 200 (with the schema's own examples, and generated ones).

A failed check is recorded, not raised, so that a run counts every case; the test fails when any
was recorded. The number of cases per operation and mode is bounded for CI;
``ICL_CL_FUZZ_EXAMPLES`` raises it (the run reported in docs/service.md used 100).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import Counter
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from icl_cl.service.app import create_app  # noqa: E402
from icl_cl.service.auth import KeySet  # noqa: E402
from icl_cl.service.settings import ServiceSettings  # noqa: E402
from tests.service_helpers import learned_store, running  # noqa: E402

EXAMPLES = int(os.environ.get("ICL_CL_FUZZ_EXAMPLES", "8"))
KEY = "fuzz-write-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    positive_data_acceptance,
    negative_data_rejection,
]
logger = logging.getLogger(__name__)


class Tally:
    """Answers by operation, mode and status, and the checks that failed (by kind)."""

    def __init__(self) -> None:
        self.statuses: Counter[tuple[str, str, int]] = Counter()
        self.failures: list[str] = []
        self.kinds: Counter[str] = Counter()

    def call(self, case: Any, mode: str) -> None:
        response = case.call(headers=AUTH, timeout=120)
        self.statuses[(case.operation.label, mode, response.status_code)] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=AUTH)
        except (AssertionError, FailureGroup) as exc:  # failed checks: recorded
            failed = exc.exceptions if isinstance(exc, FailureGroup) else (exc,)
            kinds = sorted({getattr(f, "title", type(f).__name__) for f in failed})
            kind = f"{case.operation.label} {mode} {response.status_code}: {', '.join(kinds)}"
            self.kinds[kind] += 1
            self.failures.append(f"{kind}: {response.text[:300]}; body {case.body!r:.300}")

    def count(self, status: int | None = None, label: str | None = None) -> int:
        return sum(
            n
            for (op, _mode, code), n in self.statuses.items()
            if (status is None or code == status) and (label is None or op == label)
        )


def test_generated_requests_get_no_5xx_and_agree_with_the_schema(
    tmp_path: Any, embedder: Any, wordnet: Any
) -> None:
    train, _test, labels = wordnet
    (tmp_path / "keys").write_text(f"{KEY} write\n", encoding="utf-8")
    store = learned_store(tmp_path / "store", embedder, train, labels)  # the whole sample
    limits = ServiceSettings(max_items=32, max_k=20, max_body_bytes=256 * 1024)
    app = create_app(store, settings=limits, keys=KeySet.load(tmp_path / "keys"), embedder=embedder)
    tally = Tally()
    with running(app) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=AUTH)
        operations = {op.label: op for op in (r.ok() for r in schema.get_all_operations())}
        # Every operation of the schema was read (the service grows endpoints).
        assert len(operations) == sum(len(ops) for ops in app.openapi()["paths"].values())
        predict = operations["POST /v1/predict"]
        for example in app.openapi()["components"]["schemas"]["PredictRequest"]["examples"]:
            tally.call(predict.Case(body=example, media_type="application/json"), "example")
        for operation in operations.values():
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz(operation, mode, tally)
    by_status = Counter[int]()
    for (_op, _mode, status), n in tally.statuses.items():
        by_status[status] += n
    logger.warning(
        "fuzzed %d requests; status codes: %s; predict 200: %d; failed checks: %d",
        by_status.total(),
        dict(sorted(by_status.items())),
        tally.count(200, "POST /v1/predict"),
        len(tally.failures),
    )
    assert not tally.failures, (dict(tally.kinds), "\n".join(tally.failures[:20]))
    assert not [status for status in by_status if status >= 500]
    assert tally.count(200, "POST /v1/predict") >= 1
    assert by_status.total() >= len(operations) * min(EXAMPLES, 5)


def _fuzz(operation: Any, mode: GenerationMode, tally: Tally) -> None:
    strategy = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE:
        # A rule of a body the schema cannot say: ids are unique within a request.
        strategy = strategy.filter(_ids_unique)

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: Any) -> None:
        if mode is GenerationMode.POSITIVE and case.headers and "Idempotency-Key" in case.headers:
            # A key that comes back with another body gets 422 (as the Idempotency-Key draft
            # says): a fact of the store, not of the schema. test_service.py tests the reuse.
            case.headers["Idempotency-Key"] = uuid.uuid4().hex
        tally.call(case, mode.value)

    try:
        run()
    except Unsatisfiable:  # nothing to break: no body and no parameters (GET /healthz ...)
        assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET"


def _ids_unique(case: Any) -> bool:
    body = case.body if isinstance(case.body, dict) else {}
    for field in ("inputs", "examples", "labels"):
        items = body.get(field)
        if isinstance(items, list):
            key = "label" if field == "labels" else "id"
            ids = [item.get(key) for item in items if isinstance(item, dict)]
            if len(ids) != len(set(map(str, ids))):
                return False
    return True
