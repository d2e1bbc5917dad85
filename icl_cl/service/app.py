"""The FastAPI application of ``icl-cl serve``: routes, error answers and middleware."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST

from icl_cl._version import __version__
from icl_cl.backends.base import LLMBackend
from icl_cl.config import ClassifierConfig
from icl_cl.describe import PredictionRow
from icl_cl.errors import DataError, IclClError, StoreCorruptError, StoreError
from icl_cl.images import Image
from icl_cl.inputs.checks import (
    StoreConflictError,
    check_request_size,
    decision_override,
    identified_inputs,
    printable,
)
from icl_cl.labelling.suggest import SuggestOptions, suggestion_row
from icl_cl.service.auth import BearerAuth, KeySet
from icl_cl.service.batcher import BusyError, Job, MicroBatcher
from icl_cl.service.edge import invalid_request
from icl_cl.service.limits import BodyLimit
from icl_cl.service.metrics import RequestMetrics, ServiceMetrics
from icl_cl.service.models import (
    AuditRequest,
    AuditResponse,
    EditResponse,
    ForgetRequest,
    Health,
    InfoResponse,
    LabelsResponse,
    LearnRequest,
    LearnResponse,
    PredictRequest,
    PredictResponse,
    Problem,
    Readiness,
    RelabelRequest,
    SuggestRequest,
    SuggestResponse,
    validation_problem,
)
from icl_cl.service.predictor import Answer, PredictOptions, Predictor
from icl_cl.service.schema import describe_limits
from icl_cl.service.serving import (
    STOP_WAIT_S,
    EmptyStoreError,
    IdempotencyConflictError,
    Serving,
)
from icl_cl.service.settings import ServiceSettings
from icl_cl.types import Example, Label

T = TypeVar("T")

SESSION_HEADER = "ICL-CL-Session"
"""Response header of a predict: the session of the state its predictions were made from."""

_COMMON = {
    401: {"model": Problem, "description": "missing or unknown API key"},
    403: {"model": Problem, "description": "the API key's scope does not allow this"},
    503: {"model": Problem, "description": "the request timed out"},
}
_POST = {
    **_COMMON,
    400: {"model": Problem, "description": "the body is not text (UTF-8, -16 or -32)"},
    413: {"model": Problem, "description": "request body over max_body_bytes"},
    429: {"model": Problem, "description": "too much work waiting: retry after Retry-After"},
}


def create_app(
    store: str | Path,
    config: ClassifierConfig | None = None,
    *,
    settings: ServiceSettings | None = None,
    keys: KeySet | None = None,
    embedder: Any = None,
    backend: LLMBackend | None = None,
) -> FastAPI:
    """The service over ``store`` (created empty if missing), opened when the app starts.

    Args:
        store: The store directory.
        config: A new store's config, or query-time settings for an existing one.
        settings: Limits, micro-batching and timeouts.
        keys: API keys; ``None`` serves without authentication.
        embedder: An embedder to use instead of loading the configured one.
        backend: An LLM backend to use instead of building the configured one.
    """
    settings = settings or ServiceSettings()
    metrics = ServiceMetrics()

    def open_serving() -> Serving:
        return Serving(store, config, settings, metrics, embedder=embedder, backend=backend)

    app = FastAPI(
        title="icl_cl",
        version=__version__,
        description="In-context continual classification: learn sessions while serving predictions.",
        lifespan=_lifespan,
    )
    app.state.settings, app.state.metrics = settings, metrics
    app.state.opened, app.state.open_serving = None, open_serving
    _error_answers(app)
    # Documents the bearer scheme in the OpenAPI schema; BearerAuth enforces it on every path.
    secured = [Depends(HTTPBearer(auto_error=False))] if keys is not None else []
    for add_routes in (_predict_route, _learn_route, _suggest_route, _audit_route, _edit_routes):
        add_routes(app, secured)
    _read_routes(app, secured)
    describe_limits(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if keys is not None:
        app.add_middleware(BearerAuth, keys=keys)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts 401s and 413s too
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The service's store and micro-batcher while the app runs."""
    settings: ServiceSettings = app.state.settings
    metrics: ServiceMetrics = app.state.metrics
    # Opened already by open_store (icl-cl serve), or now (an app served directly).
    serving = app.state.opened or app.state.open_serving()
    batcher = MicroBatcher(
        Predictor(serving, metrics).run,
        wait_s=settings.batch_wait_ms / 1000,
        max_items=settings.max_batch_items,
        max_queue_items=settings.max_queue_items,
        on_queue=metrics.queue_items.set,
    )
    app.state.serving, app.state.batcher = serving, batcher
    try:
        yield
    finally:  # uvicorn has drained the requests in flight; finish the queues, then close
        # Bounded: a batch still running answers requests that timed out already.
        await asyncio.to_thread(batcher.close, STOP_WAIT_S)
        await asyncio.to_thread(serving.close)


def open_store(app: FastAPI) -> None:
    """Open the app's store now, before it serves.

    A store that cannot be served (damaged, of another format, read-only with an unmerged log)
    raises its error here, for the caller to report as one line with its exit code; raised in
    the app's start-up instead, uvicorn would log a traceback and exit 3.
    """
    app.state.opened = app.state.open_serving()


async def _within(app: FastAPI, work: asyncio.Future[T]) -> T:
    """``work``'s result, or ``TimeoutError`` after the request timeout."""
    return await asyncio.wait_for(work, app.state.settings.request_timeout_s)


async def _in_thread(app: FastAPI, fn: Callable[[], T]) -> T:
    return await _within(app, asyncio.ensure_future(asyncio.to_thread(fn)))


def _predict_route(app: FastAPI, secured: list[Any]) -> None:
    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        dependencies=secured,
        responses={**_POST, 409: {"model": Problem, "description": "nothing learned yet"}},
        summary="Predict labels for texts (or images)",
    )
    async def predict(body: PredictRequest) -> Response:
        settings: ServiceSettings = app.state.settings
        serving: Serving = app.state.serving
        check_request_size(count=len(body.inputs), k=body.k or settings.default_k, limits=settings)
        items = _checked_inputs(body, serving.current.clf.config.max_text_chars)
        job = Job(items, _options(body, serving))
        answer: Answer = await _within(app, asyncio.wrap_future(app.state.batcher.submit(job)))
        abstain = body.abstain_below is not None
        rows = [
            PredictionRow.of(item.id, pred, abstain=abstain)
            for item, pred in zip(body.inputs, answer.predictions, strict=True)
        ]
        # The rows are already validated: encoded directly, without FastAPI validating them
        # again against PredictResponse (a third of a request's time).
        return Response(
            PredictResponse.model_construct(predictions=rows).model_dump_json(),
            media_type="application/json",
            headers={SESSION_HEADER: str(answer.session)},
        )


def _checked_inputs(body: PredictRequest | SuggestRequest, max_chars: int) -> list[str | Image]:
    entries = [(item.id, item.text, item.image) for item in body.inputs]
    return identified_inputs(entries, max_chars=max_chars)


def _suggest_route(app: FastAPI, secured: list[Any]) -> None:
    @app.post(
        "/v1/suggest",
        response_model=SuggestResponse,
        dependencies=secured,
        responses={**_POST, 409: {"model": Problem, "description": "nothing learned yet"}},
        summary="What to label next: rank a pool of unlabelled inputs (reads the store only)",
    )
    async def suggest(body: SuggestRequest) -> Response:
        settings: ServiceSettings = app.state.settings
        serving: Serving = app.state.serving
        k = body.k or settings.default_k
        check_request_size(count=len(body.inputs), k=k, limits=settings)
        items = _checked_inputs(body, serving.current.clf.config.max_text_chars)
        options = SuggestOptions(
            body.strategy, k, body.confidence, neighbours=body.neighbours, seed=body.seed
        )

        def rank() -> tuple[int, list[dict[str, Any]]]:
            with serving.reading() as snapshot:  # one state throughout, as a predict reads
                if snapshot.clf.memory.n_examples == 0:
                    raise EmptyStoreError("the store is empty: learn a session first")
                ids = [item.id for item in body.inputs]
                found = snapshot.clf.suggest(items, body.budget, ids=ids, options=options)
                return snapshot.session, [suggestion_row(s) for s in found]

        session, rows = await _in_thread(app, rank)
        return Response(
            json.dumps({"suggestions": rows}, ensure_ascii=False, separators=(",", ":")),
            media_type="application/json",
            headers={SESSION_HEADER: str(session)},
        )


def _audit_route(app: FastAPI, secured: list[Any]) -> None:
    @app.post(
        "/v1/audit",
        response_model=AuditResponse,
        dependencies=secured,
        responses={**_POST, 409: {"model": Problem, "description": "nothing learned yet"}},
        summary="Which stored labels are probably wrong (reads the store only)",
    )
    async def audit(body: AuditRequest) -> Response:
        settings: ServiceSettings = app.state.settings
        k = body.k or settings.default_k
        check_request_size(k=k, limits=settings)

        def run() -> tuple[int, dict[str, Any]]:
            # On a classifier of its own: predictions do not wait for an audit of the store.
            with app.state.serving.private_reading() as snapshot:
                if snapshot.clf.memory.n_examples == 0:
                    raise EmptyStoreError("the store is empty: learn a session first")
                report = snapshot.clf.audit(
                    k, scorer=body.scorer, limit=body.limit, neighbours=body.neighbours
                )
                rows = [f.to_dict(report.multi_label) for f in report.findings]
                return snapshot.session, {**report.summary(), "findings": rows}

        session, answer = await _in_thread(app, run)
        return Response(
            json.dumps(answer, ensure_ascii=False, separators=(",", ":")),
            media_type="application/json",
            headers={SESSION_HEADER: str(session)},
        )


def _options(body: PredictRequest, serving: Serving) -> PredictOptions:
    stored = serving.current.clf.config.decision
    decision = decision_override(stored, body.decision, body.threshold)
    return PredictOptions(
        k=body.k or serving.settings.default_k,
        scorer=body.scorer,
        confidence=body.confidence,
        abstain_below=body.abstain_below,
        decision=decision,
        use_llm=serving.uses_llm and not body.no_llm,
    )


def _learn_route(app: FastAPI, secured: list[Any]) -> None:
    @app.post(
        "/v1/learn",
        response_model=LearnResponse,
        dependencies=secured,
        responses={**_POST, 409: _LEARN_CONFLICT},
        summary="Learn one session of labelled examples (all or nothing)",
    )
    async def learn(
        body: LearnRequest,
        idempotency_key: str | None = Header(
            None,
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            description="a retried request with the same key returns the first answer",
        ),
    ) -> LearnResponse:
        settings: ServiceSettings = app.state.settings
        check_request_size(count=len(body.examples), what="examples", limits=settings)
        examples = [Example(ex.id, ex.text, ex.labels) for ex in body.examples]
        labels = [Label(lab.label, lab.name, lab.description, lab.group) for lab in body.labels]
        try:
            future = app.state.serving.learn(examples, labels, idempotency_key)
            learned: LearnResponse = await _within(app, asyncio.wrap_future(future))
        except DataError as exc:
            return _learn_problem(exc, body)  # type: ignore[return-value]
        return learned


_LABEL_FIELDS = ("label", "name", "description", "group")
_LEARN_CONFLICT = {
    "description": "the session contradicts the store (an id it holds, a label defined "
    "otherwise, a label count its label mode refuses, nothing new; detail[0].loc names "
    "where), or another process writes the store",
    "content": {
        "application/json": {
            "schema": {
                "anyOf": [
                    {"$ref": "#/components/schemas/HTTPValidationError"},
                    {"$ref": "#/components/schemas/Problem"},
                ]
            }
        }
    },
}


def _learn_problem(exc: DataError, body: LearnRequest) -> JSONResponse:
    """A learn's refusal naming the example or label definition: 409 when it contradicts the
    store (:class:`StoreConflictError`), else 422."""
    loc: list[str | int] = ["body", "examples"]
    if exc.field in _LABEL_FIELDS:
        names = [lab.label for lab in body.labels]
        loc = ["body", "labels"] + ([names.index(exc.item)] if exc.item in names else [])
    else:
        ids = [ex.id for ex in body.examples]
        loc += [ids.index(exc.item)] if exc.item in ids else []
    if exc.field:
        loc.append(exc.field)
    status = 409 if isinstance(exc, StoreConflictError) else 422
    return JSONResponse(validation_problem(loc, printable(str(exc))), status_code=status)


_IDEMPOTENCY = Header(
    None,
    alias="Idempotency-Key",
    min_length=1,
    max_length=200,
    description="a retried request with the same key returns the first answer",
)


_EDIT_CONFLICT = {
    **_LEARN_CONFLICT,
    "description": "the edit contradicts the store (an id or label it does not hold, a label "
    "count its label mode refuses, a label it does not know without its definition or defined "
    "otherwise, a label left without examples), or another process writes the store",
}


def _edit_routes(app: FastAPI, secured: list[Any]) -> None:
    """``POST /v1/forget`` and ``POST /v1/relabel``: writes, served as a learn (one writer, the
    new state served once the edit is committed, the heads refitted in the background)."""

    async def edit(kind: str, request: dict[str, Any], key: str | None) -> Any:
        try:
            future = app.state.serving.edit(kind, request, key)
            return EditResponse(**await _within(app, asyncio.wrap_future(future)))
        except DataError as exc:
            status = 409 if isinstance(exc, StoreConflictError) else 422
            problem = validation_problem(["body"], printable(str(exc)))
            return JSONResponse(problem, status_code=status)

    @app.post(
        "/v1/forget",
        response_model=EditResponse,
        dependencies=secured,
        responses={**_POST, 409: _EDIT_CONFLICT},
        summary="Forget stored examples, or labels with their examples, exactly (atomic)",
    )
    async def forget(body: ForgetRequest, idempotency_key: str | None = _IDEMPOTENCY) -> Any:
        return await edit("forget", {"ids": body.ids, "labels": body.labels}, idempotency_key)

    @app.post(
        "/v1/relabel",
        response_model=EditResponse,
        dependencies=secured,
        responses={**_POST, 409: _EDIT_CONFLICT},
        summary="Replace the labels of stored examples, exactly (atomic)",
    )
    async def relabel(body: RelabelRequest, idempotency_key: str | None = _IDEMPOTENCY) -> Any:
        request = {
            "examples": {ex.id: ex.labels for ex in body.examples},
            "definitions": [[x.label, x.name, x.description, x.group] for x in body.labels],
        }
        return await edit("relabel", request, idempotency_key)


def _read_routes(app: FastAPI, secured: list[Any]) -> None:
    @app.get("/v1/labels", response_model=LabelsResponse, dependencies=secured, responses=_COMMON)
    async def labels() -> dict[str, Any]:
        def table() -> list[dict[str, Any]]:
            with app.state.serving.reading() as snapshot:
                return snapshot.clf.labels()

        return {"labels": await _in_thread(app, table)}

    @app.get("/v1/info", response_model=InfoResponse, dependencies=secured, responses=_COMMON)
    async def info() -> dict[str, Any]:
        def describe() -> dict[str, Any]:
            with app.state.serving.reading() as snapshot:
                return {**snapshot.clf.info(), "serving_session": snapshot.session}

        return await _in_thread(app, describe)

    @app.get("/healthz", response_model=Health, summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        dependencies=secured,
        responses={**_COMMON, 503: {"model": Readiness, "description": "not ready, and why"}},
        summary="The models are loaded, the store is open and the heads are fitted",
    )
    async def readyz() -> Any:
        state: Readiness = await _in_thread(app, app.state.serving.ready)
        return JSONResponse(state.model_dump(), status_code=200 if state.ready else 503)

    @app.get(
        "/metrics",
        dependencies=secured,
        responses={**_COMMON, 200: {"content": {CONTENT_TYPE_LATEST: {}}}},
        response_class=Response,
        summary="Prometheus metrics",
    )
    async def metrics() -> Response:
        return Response(app.state.metrics.text(), media_type=CONTENT_TYPE_LATEST)


def _unprocessable(loc: Sequence[str | int], message: str) -> JSONResponse:
    return JSONResponse(validation_problem(list(loc), printable(message)), status_code=422)


def _error_answers(app: FastAPI) -> None:
    """The status code of each error a route lets through."""

    def problem(status: int, retry: bool = False) -> Callable[[Request, Exception], Any]:
        async def answer(_request: Request, exc: Exception) -> JSONResponse:
            headers = {"Retry-After": "1"} if retry else None
            detail = str(exc) or "the request timed out"
            return JSONResponse({"detail": detail}, status_code=status, headers=headers)

        return answer

    def invalid(loc: Callable[[Exception], list[str | int]]) -> Callable[[Request, Exception], Any]:
        async def answer(_request: Request, exc: Exception) -> JSONResponse:
            return _unprocessable(loc(exc), str(exc))

        return answer

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(DataError, invalid(_input_loc))
    app.add_exception_handler(
        IdempotencyConflictError, invalid(lambda _: ["header", "Idempotency-Key"])
    )
    app.add_exception_handler(EmptyStoreError, problem(409))
    app.add_exception_handler(StoreError, problem(409))
    # Damage is the server's fault, not the request's: never a 4xx, never a traceback.
    app.add_exception_handler(StoreCorruptError, problem(500))
    app.add_exception_handler(BusyError, problem(429, retry=True))
    app.add_exception_handler(TimeoutError, problem(503, retry=True))
    app.add_exception_handler(IclClError, invalid(lambda _: ["body"]))


_BODY_FIELDS = ("inputs", "examples", "k")


def _input_loc(exc: Exception) -> list[str | int]:
    """Where a predict's :class:`DataError` points: ``body.inputs[i].field`` when it says."""
    item = getattr(exc, "item", None)
    field = getattr(exc, "field", None)
    if item is None and field in _BODY_FIELDS:  # a request over a limit
        return ["body", field]
    loc: list[str | int] = ["body", "inputs"]
    if item is not None and item.isdigit():
        loc.append(int(item))
    return [*loc, field] if field else loc
