"""A small client of the service: :class:`Client` with ``predict`` and ``learn``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from icl_cl.errors import IclClError


class ServiceError(IclClError):
    """The service answered with an error (``status``, and its ``detail``)."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {detail}")


# Answers worth another try: too much work waiting, a timeout, a restart under way.
_RETRY_STATUS = frozenset({429, 502, 503, 504})


class Client:
    """Calls an ``icl-cl serve`` service.

    Args:
        url: The service's root, e.g. ``http://127.0.0.1:8080``.
        api_key: A key of the service's key file (``None`` for a service without keys).
        timeout: Seconds to wait for one answer.
        retries: Further tries after a connection error or a 429/5xx answer; a learn retries
            with the same ``Idempotency-Key``, so it is never learned twice.
        backoff: Seconds before the first retry (doubling, at most 5 s; ``Retry-After`` when
            the service gives one).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.2,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries = retries
        self.backoff = backoff

    def predict(
        self, inputs: Sequence[str | Mapping[str, Any]], **options: Any
    ) -> list[dict[str, Any]]:
        """Predictions for ``inputs`` (texts, or ``{"id", "text"}`` / ``{"id", "image"}``
        objects; a text gets its position as id), one dict per input as a line of
        ``icl-cl predict``. ``options``: ``k``, ``scorer``, ``confidence``, ``abstain_below``,
        ``decision``, ``threshold``, ``no_llm``."""
        body = {
            "inputs": [
                {"id": str(i), "text": item} if isinstance(item, str) else dict(item)
                for i, item in enumerate(inputs)
            ],
            **options,
        }
        return self._post("/v1/predict", body)["predictions"]

    def learn(
        self,
        examples: Sequence[Mapping[str, Any]],
        labels: Sequence[Mapping[str, Any]] = (),
        *,
        idempotency_key: str | None = None,
    ) -> dict[str, int]:
        """Learn one session of ``{"id", "text", "labels"}`` examples and ``{"label", "name",
        "description", "group"}`` definitions; returns ``{"session", "examples",
        "new_labels"}``. Every try sends the same ``idempotency_key`` (a new one by default)."""
        key = idempotency_key or uuid.uuid4().hex
        body = {"examples": [dict(ex) for ex in examples], "labels": [dict(lab) for lab in labels]}
        return self._post("/v1/learn", body, {"Idempotency-Key": key})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _post(self, path: str, body: Any, headers: Mapping[str, str] | None = None) -> Any:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.post(path, json=body, headers=headers)
            except httpx.TransportError:
                if last:
                    raise
                time.sleep(min(self.backoff * 2**attempt, 5.0))
                continue
            if response.status_code in _RETRY_STATUS and not last:
                wait = response.headers.get("Retry-After")
                time.sleep(
                    float(wait) if wait and wait.isdigit() else min(self.backoff * 2**attempt, 5.0)
                )
                continue
            if response.status_code >= 400:
                raise ServiceError(response.status_code, _detail(response))
            return response.json()
        raise AssertionError("unreachable: the last try returns or raises")


def _detail(response: httpx.Response) -> Any:
    try:
        return response.json().get("detail")
    except ValueError:
        return response.text
