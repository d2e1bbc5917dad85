"""Prometheus metrics of one service, in a registry of its own (two services never mix)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from icl_cl.types import Prediction

# The endpoints a metric names; any other path is counted as "other", so that a scan of random
# paths cannot grow the label set without bound.
ENDPOINTS = frozenset(
    {"/v1/predict", "/v1/learn", "/v1/labels", "/v1/info", "/healthz", "/readyz", "/metrics"}
    | {"/docs", "/openapi.json"}
)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServiceMetrics:
    """The counters and histograms of ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Histogram(
            "icl_cl_http_request_seconds",
            "HTTP requests and their latency, by endpoint, method and status",
            ["endpoint", "method", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter("icl_cl_items_classified_total", "Inputs classified", registry=r)
        self.llm_calls = Counter(
            "icl_cl_llm_calls_total", "LLM calls made by predictions", registry=r
        )
        self.fallbacks = Counter(
            "icl_cl_llm_fallbacks_total",
            "Predictions the ECL decided alone although an LLM is configured, by reason",
            ["reason"],
            registry=r,
        )
        self.sessions = Counter("icl_cl_learn_sessions_total", "Sessions learned", registry=r)
        self.refit = Histogram(
            "icl_cl_refit_seconds",
            "Background refits: reopening the store and fitting the heads",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.refitting = Gauge(
            "icl_cl_refit_running", "1 while a background refit runs, else 0", registry=r
        )
        self.batch_items = Histogram(
            "icl_cl_predict_batch_items",
            "Inputs per micro-batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.queue_items = Gauge(
            "icl_cl_queue_items", "Inputs waiting to be classified", registry=r
        )
        self.serving_session = Gauge(
            "icl_cl_serving_session",
            "Sessions in the state predictions are served from",
            registry=r,
        )

    def predicted(self, predictions: Sequence[Prediction]) -> None:
        """Count classified inputs, their LLM calls and their fallbacks."""
        self.items.inc(len(predictions))
        for pred in predictions:
            if pred.cost is not None:
                self.llm_calls.inc(pred.cost.calls)
            if pred.fallback is not None:
                self.fallbacks.labels(pred.fallback.reason.name.lower()).inc()

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: times every request and counts it by endpoint, method and status."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).observe(
                time.perf_counter() - start
            )
