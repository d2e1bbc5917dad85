"""The one way an ASGI middleware of the service answers an error: a JSON ``{"detail"}``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


async def send_problem(
    send: Any, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    """Send a whole ``{"detail": detail}`` response with ``status`` and extra ``headers``."""
    body = json.dumps({"detail": detail}).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": start + list(headers)})
    await send({"type": "http.response.body", "body": body})
