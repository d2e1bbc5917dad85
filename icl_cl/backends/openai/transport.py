"""HTTP to an OpenAI-compatible server: one exchange, retries within limits, timeouts, the thread
pool for concurrent requests, and the count of calls, tokens, retries and failures.

Only the standard library speaks HTTP here (``urllib.request``). Rate limits (HTTP 429,
honouring ``Retry-After``), timeouts, connection errors and 5xx answers are retried with
exponential back-off; other 4xx answers fail at once (:class:`ClientError`), and a refusal that
names the context length raises :class:`~icl_cl.errors.ContextLengthError`.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from icl_cl.backends.base import Usage
from icl_cl.errors import (
    BackendError,
    BackendTimeoutError,
    ConfigError,
    ContextLengthError,
    ParseError,
    RateLimitError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Phrases of context-length refusals: OpenAI and llama-cpp-python ("maximum context length"),
# vLLM ("longer than the maximum model length", "max_model_len"), llama-server ("exceeds the
# available context size").
_CONTEXT_PATTERNS = (
    "context length",
    "context_length",
    "context window",
    "context size",
    "maximum context",
    "maximum model length",
    "max_model_len",
    "too many tokens",
    "prompt is too long",
    "input is too long",
)
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
# The longest wait a Retry-After header may impose.
_MAX_RETRY_AFTER = 60.0


class ClientError(BackendError):
    """A 4xx answer other than 429 or a context-length error: the request itself is refused."""


class RetryableError(BackendError):
    """Internal marker: a failed attempt that a retry may fix (wraps the public error)."""

    def __init__(self, error: BackendError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def error_message(raw: bytes) -> str:
    """The human message inside an error body (OpenAI, FastAPI or plain text layouts)."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:2000]
    if isinstance(data, Mapping):
        err = data.get("error", data)
        if isinstance(err, Mapping):
            for key in ("message", "detail", "msg"):
                if err.get(key):
                    return str(err[key])
        elif isinstance(err, str):
            return err
        if data.get("detail"):
            return str(data["detail"])
    return text[:2000]


def retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (the delta-seconds form; HTTP dates are ignored)."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None


def looks_like_context_error(message: str) -> bool:
    """Whether a server's error message says that the prompt does not fit the context."""
    low = message.lower()
    return any(p in low for p in _CONTEXT_PATTERNS)


def http_error(error: urllib.error.HTTPError, url: str) -> BackendError:
    """The public error for an HTTP error answer, wrapped in :class:`RetryableError` when a
    retry may fix it."""
    try:
        message = error_message(error.read())
    except Exception:  # the body may be gone with the connection
        message = str(error.reason)
    finally:
        error.close()
    status = error.code
    text = f"HTTP {status} from {url}: {message}"
    if status == 429:
        return RetryableError(RateLimitError(text), retry_after(error.headers.get("Retry-After")))
    if status in (400, 413, 422, 500) and looks_like_context_error(message):
        return ContextLengthError(text)
    if status == 408:
        return RetryableError(BackendTimeoutError(text))
    if status >= 500:
        return RetryableError(BackendError(text))
    return ClientError(text)


class Transport:
    """JSON over HTTP to one server, for one model.

    Args:
        model: Model name sent in every completion request.
        base_url: Server URL up to and including ``/v1``.
        api_key: Bearer token (none when empty).
        timeout: Seconds to wait for one HTTP answer.
        max_retries: Retries after the first attempt; the last error is raised after them.
        backoff: First back-off in seconds, doubled on every retry.
        concurrency: Threads sending requests for several prompts at once.
        extra_body: Merged into every completion request body.

    Raises:
        ConfigError: A negative ``max_retries``, ``concurrency`` below 1 or a ``timeout`` that
            is not positive.

    Attributes:
        usage: Cost of every request so far, failed ones included.
        lock: Guards ``usage`` and the other shared counters of the backend.
    """

    def __init__(
        self,
        *,
        model: str,
        base_url: str,
        api_key: str | None,
        timeout: float,
        max_retries: int,
        backoff: float,
        concurrency: int,
        extra_body: Mapping[str, Any],
    ) -> None:
        if max_retries < 0 or concurrency < 1 or timeout <= 0:
            raise ConfigError("max_retries >= 0, concurrency >= 1 and timeout > 0 are required")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.concurrency = int(concurrency)
        self.extra_body = dict(extra_body)
        self.usage = Usage()
        self.lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        # Env proxies must not capture loopback traffic (local servers, tests).
        handlers: list[urllib.request.BaseHandler] = (
            [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        )
        self._opener = urllib.request.build_opener(*handlers)

    @property
    def root_url(self) -> str:
        """Server root (``base_url`` without a trailing ``/v1``): non-OpenAI routes live there."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    def attempt(self, method: str, url: str, body: Mapping[str, Any] | None) -> dict[str, Any]:
        """One HTTP exchange; raises the public error, wrapped in :class:`RetryableError` if a
        retry may fix it."""
        data = json.dumps(body).encode("utf-8") if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise http_error(e, url) from e
        except TimeoutError as e:
            raise self._timeout(url) from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise self._timeout(url) from e
            raise RetryableError(BackendError(f"cannot reach {url}: {e.reason}")) from e
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise RetryableError(BackendError(f"connection to {url} failed: {e!r}")) from e
        try:
            parsed = json.loads(raw)
        except ValueError as e:
            raise RetryableError(BackendError(f"invalid JSON from {url}: {raw[:200]!r}")) from e
        if not isinstance(parsed, dict):
            raise BackendError(f"unexpected answer from {url}: {raw[:200]!r}")
        return parsed

    def _timeout(self, url: str) -> RetryableError:
        return RetryableError(
            BackendTimeoutError(f"no answer from {url} within {self.timeout:g} s")
        )

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        usage: Usage,
        *,
        root: bool = False,
        count_call: bool = True,
        retries: int | None = None,
    ) -> dict[str, Any]:
        """An HTTP call with retries; adds calls, tokens, retries and failures to ``usage``.

        Args:
            method: ``GET`` or ``POST``.
            path: Route after ``base_url`` (after the server root with ``root``).
            body: JSON body, or None.
            usage: Where this call's cost goes.
            root: The route is not under ``/v1``.
            count_call: Count a success as a model call (not for probes and tokenisation).
            retries: Overrides ``max_retries`` for this call.
        """
        url = (self.root_url if root else self.base_url) + path
        max_retries = self.max_retries if retries is None else retries
        last: BackendError | None = None
        for attempt in range(max_retries + 1):
            if attempt:
                self._count(usage, retries=1)
            try:
                result = self.attempt(method, url, body)
            except RetryableError as e:
                last = e.error
                last.__cause__ = e.__cause__  # keep the network error in the traceback
                self._count(usage, failures=1)
                if attempt < max_retries:
                    self._back_off(attempt, max_retries, e)
                continue
            except BackendError:
                self._count(usage, failures=1)
                raise
            tokens = result.get("usage") or {}
            self._count(
                usage,
                calls=int(count_call),
                prompt_tokens=int(tokens.get("prompt_tokens") or 0),
                completion_tokens=int(tokens.get("completion_tokens") or 0),
            )
            return result
        assert last is not None
        raise last

    def _back_off(self, attempt: int, max_retries: int, error: RetryableError) -> None:
        delay = self.backoff * (2**attempt)
        if error.retry_after is not None:
            delay = max(delay, min(error.retry_after, _MAX_RETRY_AFTER))
        logger.warning("%s; retry %d/%d in %.2f s", error.error, attempt + 1, max_retries, delay)
        time.sleep(delay)

    def _count(self, usage: Usage, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(usage, name, getattr(usage, name) + value)

    def completion(
        self, body: Mapping[str, Any], usage: Usage, *, retries: int | None = None
    ) -> dict[str, Any]:
        """POST to ``/v1/completions``; the answer has choices."""
        return self._choices("/completions", "completion", body, usage, retries)

    def chat(
        self, body: Mapping[str, Any], usage: Usage, *, retries: int | None = None
    ) -> dict[str, Any]:
        """POST to ``/v1/chat/completions``; the answer has choices."""
        return self._choices("/chat/completions", "chat completion", body, usage, retries)

    def _choices(
        self, path: str, what: str, body: Mapping[str, Any], usage: Usage, retries: int | None
    ) -> dict[str, Any]:
        """POST ``body`` (with the model and extra fields) to ``path``; the answer must have
        choices."""
        payload = {"model": self.model, **self.extra_body, **body}
        result = self.request("POST", path, payload, usage, retries=retries)
        if not isinstance(result.get("choices"), list) or not result["choices"]:
            raise ParseError(f"{what} without choices: {str(result)[:200]}")
        return result

    def map(
        self, fn: Callable[[Any], T], items: Sequence[Any], *, one_at_a_time: bool = False
    ) -> list[T]:
        """``fn`` over ``items`` on the thread pool (in order); inline for a single item, or
        when the server should see ``one_at_a_time``."""
        if len(items) <= 1 or self.concurrency == 1 or one_at_a_time:
            return [fn(x) for x in items]
        if self._pool is None:
            with self.lock:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        max_workers=self.concurrency, thread_name_prefix="icl-cl-openai"
                    )
        return list(self._pool.map(fn, items))

    def finish(self, usage: Usage, started: float) -> None:
        """Close a call's ``usage`` (its wall time) and add it to the running total."""
        usage.seconds = time.perf_counter() - started
        with self.lock:
            self.usage.add(usage)

    def close(self) -> None:
        """Shut the thread pool down (a new one starts on the next concurrent call)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
