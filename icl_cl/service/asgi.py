"""How an ASGI middleware of the service answers: a whole JSON response, encoded safely."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


async def send_json(
    send: Any, status: int, content: Any, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Send a whole JSON response with ``status`` and extra ``headers``. The body is ASCII
    (anything else escaped), so any string can be sent."""
    body = json.dumps(content, separators=(",", ":")).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": start + list(headers)})
    await send({"type": "http.response.body", "body": body})


async def send_problem(
    send: Any, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Send a whole ``{"detail": detail}`` response with ``status`` and extra ``headers``."""
    await send_json(send, status, {"detail": detail}, headers)
