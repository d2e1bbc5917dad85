"""Fuzzing the service from its own OpenAPI schema (schemathesis): no generated request may get
a server error (5xx), and every answer must match the schema (status code, content type, body).

The number of cases per operation is bounded for CI; ``ICL_CL_FUZZ_EXAMPLES`` raises it (the
run reported in docs/service.md used 100 per operation).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from icl_cl.service.app import create_app  # noqa: E402
from icl_cl.service.auth import KeySet  # noqa: E402
from icl_cl.service.settings import ServiceSettings  # noqa: E402
from tests.service_helpers import learned_store, running  # noqa: E402

EXAMPLES = int(os.environ.get("ICL_CL_FUZZ_EXAMPLES", "12"))
KEY = "fuzz-write-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
logger = logging.getLogger(__name__)


def test_generated_requests_get_no_5xx_and_match_the_schema(
    tmp_path: Any, embedder: Any, wordnet: Any
) -> None:
    train, _test, labels = wordnet
    (tmp_path / "keys").write_text(f"{KEY} write\n", encoding="utf-8")
    store = learned_store(tmp_path / "store", embedder, train[:120], labels)
    limits = ServiceSettings(max_items=32, max_k=20, max_body_bytes=256 * 1024)
    app = create_app(store, settings=limits, keys=KeySet.load(tmp_path / "keys"), embedder=embedder)
    statuses: Counter[tuple[str, int]] = Counter()
    with running(app) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=AUTH)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 7
        for operation in operations:
            _fuzz(operation, statuses)
    counts = Counter[int]()
    for (_label, status), n in statuses.items():
        counts[status] += n
    logger.warning(
        "fuzzed %d requests; status codes: %s", counts.total(), dict(sorted(counts.items()))
    )
    assert counts.total() >= 7 * min(EXAMPLES, 5)
    assert not [status for status in counts if status >= 500]


def _fuzz(operation: Any, statuses: Counter[tuple[str, int]]) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: Any) -> None:
        response = case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=120)
        statuses[(operation.label, response.status_code)] += 1

    run()
