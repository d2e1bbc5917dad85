"""The request body limit: an ASGI middleware that answers 413 past ``max_body_bytes``, and 422
for a JSON body with what no field may hold (see :mod:`icl_cl.service.edge`)."""

from __future__ import annotations

from typing import Any

from icl_cl.service.asgi import send_json, send_problem
from icl_cl.service.edge import unclean_body


class BodyLimit:
    """Reads a request body up to ``max_bytes`` (refusing a larger declared or sent one with
    413 before the app sees it), checks it, then hands the app the body it read.

    How long a client may take to send it is the HTTP protocol's read timeout
    (:mod:`icl_cl.service.protocol`)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        chunks, size = [], 0
        # Each message but the last carries at least a byte, so a body within the limit takes
        # at most max_bytes + 1 of them (an empty chunk with more to come is skipped over).
        for _ in range(self.max_bytes + 2):
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False
        problem = unclean_body(scope, body)
        if problem is not None:  # the whole body was read: the connection stays usable
            await send_json(send, 422, problem)
            return

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:  # the body was read: from now on, wait for the client to go away
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send: Any) -> None:
        detail = f"request body over {self.max_bytes} bytes (max_body_bytes)"
        await send_problem(send, 413, detail, [(b"connection", b"close")])
