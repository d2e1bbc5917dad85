"""Typed errors. Every error the library raises on purpose derives from :class:`IclClError`."""

from __future__ import annotations


class IclClError(Exception):
    """Base class of all icl_cl errors."""


class ConfigError(IclClError):
    """A configuration value is invalid or conflicts with the store."""


class DataError(IclClError):
    """Input data is invalid. Names where: source file, line (1-based) and field when known."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        field: str | None = None,
        item: str | None = None,
    ) -> None:
        self.reason = message
        self.source = source
        self.line = line
        self.field = field
        self.item = item
        where = []
        if source is not None:
            where.append(f"{source}" + (f":{line}" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if item is not None:
            where.append(f"item {item!r}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class StoreError(IclClError):
    """The store cannot be opened or written: incompatible version, corruption, or a concurrent writer."""


class WorkerError(IclClError):
    """A distributed worker died or failed (Ray); a session it was learning is not committed."""


class BackendError(IclClError):
    """An LLM backend failed."""


class RateLimitError(BackendError):
    """The backend refused the call for rate reasons; retried with back-off."""


class BackendTimeoutError(BackendError):
    """The backend did not answer in time."""


class ContextLengthError(BackendError):
    """A prompt does not fit the model's context window."""


class ParseError(BackendError):
    """Model output could not be parsed into the expected answer."""
