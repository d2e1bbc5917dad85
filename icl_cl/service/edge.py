"""Input hygiene at the service's edge: values no check downstream should see are refused with
422 naming the field before the routes parse the body, and every 422 is written so that it
can always be encoded.

JSON lets a string hold a lone surrogate (``"\\ud800"``), and Python's parser takes the
``NaN``, ``Infinity`` and ``-Infinity`` literals. Neither is valid data here: a surrogate is
not a character (it cannot be encoded, stored or embedded), and no option takes a non-finite
number (nor can a JSON answer that echoes one be written). The docs refuse non-UTF-8 text
rather than repair it, so these are refused too, in every field, in the same way.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from icl_cl.inputs.checks import first_unclean, printable
from icl_cl.service.models import validation_problem


def unclean_body(scope: dict[str, Any], body: bytes) -> dict[str, Any] | None:
    """The 422 answer to a request whose JSON body holds a lone surrogate or a non-finite
    number (naming where), or ``None``: the body is clean, not JSON for the routes, or does
    not parse (the route answers that: 422 for bad JSON, 400 for bytes that are not text)."""
    if not _is_json(scope):
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    found = first_unclean(data, max_nodes=len(body) + 1)
    if found is None:
        return None
    loc, reason = found
    return validation_problem(["body", *loc], reason)


def _is_json(scope: dict[str, Any]) -> bool:
    """Whether the routes will parse this body as JSON (as FastAPI decides, with its strict
    content type: ``application/json`` or ``application/*+json``)."""
    value = dict(scope["headers"]).get(b"content-type")
    if value is None:
        return False
    media = value.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


async def invalid_request(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 for a body, header or query that fails its model, without echoing the
    input (which may be large, or hold what cannot be encoded): ``loc``, ``msg`` and ``type``."""
    assert isinstance(exc, RequestValidationError)
    detail = [
        {
            "loc": [printable(part) if isinstance(part, str) else part for part in error["loc"]],
            "msg": printable(str(error["msg"])),
            "type": str(error["type"]),
        }
        for error in exc.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)
