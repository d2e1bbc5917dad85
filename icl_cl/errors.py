"""Typed errors. Every error the library raises on purpose derives from :class:`IclClError`.

Each kind has its own exit code (``exit_code``), which the command line returns, so a script can
tell bad input from a damaged store or a busy one without reading the message. 1 is left to
unexpected failures and 2 to command-line usage (as argparse uses it).
"""

from __future__ import annotations


class IclClError(Exception):
    """Base class of all icl_cl errors; raised as itself for a wrong command-line usage."""

    exit_code = 2


class ConfigError(IclClError):
    """A configuration value is invalid or conflicts with the store."""

    exit_code = 3


class DataError(IclClError):
    """Input data is invalid. Names where: source file, line (1-based) and field when known."""

    exit_code = 4

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
    """The store cannot be opened or written: missing, another format version, or read-only."""

    exit_code = 5


class StoreCorruptError(StoreError):
    """The store's files disagree with their checksums or with each other, or one is missing."""

    exit_code = 6


class StoreBusyError(StoreError):
    """Another process holds the store's writer lock (a learn is running)."""

    exit_code = 7


class OutputError(IclClError):
    """An output file cannot be written where it was asked for."""

    exit_code = 8


class WorkerError(IclClError):
    """A distributed worker died or failed (Ray); a session it was learning is not committed."""


class BackendError(IclClError):
    """An LLM backend failed."""

    exit_code = 9


class RateLimitError(BackendError):
    """The backend refused the call for rate reasons; retried with back-off."""


class BackendTimeoutError(BackendError):
    """The backend did not answer in time."""


class ContextLengthError(BackendError):
    """A prompt does not fit the model's context window."""


class ParseError(BackendError):
    """Model output could not be parsed into the expected answer."""
