"""Slow clients: uvicorn's HTTP protocol with a deadline on receiving each request.

uvicorn times out an idle keep-alive connection (``timeout_keep_alive``), but nothing else: a
client that opens a connection and sends nothing, half a request line, half the headers or
half the body holds its connection (and the request's task) for as long as it likes. Here a
request must be received whole, headers and body, within ``read_timeout_s`` of its first byte
(of the connection, for the first request); otherwise the connection is closed. The deadline
ends when the request is received, so a slow answer is never cut (``request_timeout_s`` bounds
that). Between requests the keep-alive timeout applies as before.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)


def timed_protocol(read_timeout_s: float) -> type[asyncio.Protocol] | str:
    """The HTTP protocol class uvicorn should use (``Config(http=...)``): httptools' with the
    read deadline, or ``"auto"`` (no deadline, logged) when httptools is not installed."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        logger.warning(
            "httptools is not installed (the serve extra has it): no read timeout for slow clients"
        )
        return "auto"

    class TimedHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc]
        """httptools' protocol; a request not received within ``read_timeout_s`` closes the
        connection."""

        timeout = read_timeout_s

        def connection_made(self, transport: Any) -> None:
            self._read_deadline: asyncio.TimerHandle | None = None
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()  # no-op when armed: the first request's deadline runs from connecting

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm()

        def _arm(self) -> None:
            if self._read_deadline is None:
                self._read_deadline = self.loop.call_later(self.timeout, self._expired)

        def _disarm(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def _expired(self) -> None:
            self._read_deadline = None
            if not self.transport.is_closing():
                client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
                logger.info(
                    "closing the connection of %s: no whole request within %.3gs (read_timeout_s)",
                    client,
                    self.timeout,
                )
                self.transport.close()

    return TimedHttpToolsProtocol
