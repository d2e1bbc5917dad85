"""The request body limit: an ASGI middleware that answers 413 past ``max_body_bytes``."""

from __future__ import annotations

from typing import Any

from icl_cl.service.asgi import send_problem


class BodyLimit:
    """Reads a request body up to ``max_bytes`` (refusing a larger declared or sent one with
    413 before the app sees it), then hands the app the body it read."""

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
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

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
