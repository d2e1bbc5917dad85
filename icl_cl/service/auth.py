"""API keys with a scope, checked in constant time, and the middleware that asks for them.

A key file holds one key per line, ``KEY SCOPE``, with scope ``read`` (predict, labels, info,
metrics, docs) or ``write`` (also learn); blank lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icl_cl.errors import ConfigError
from icl_cl.service.asgi import send_problem

logger = logging.getLogger(__name__)

SCOPES = ("read", "write")
# What each scope may do: a write key may also read.
_GRANTS = {"read": {"read"}, "write": {"read", "write"}}
# Paths served without a key, and paths that need the write scope.
OPEN_PATHS = frozenset({"/healthz"})
WRITE_PATHS = frozenset({"/v1/learn", "/v1/forget", "/v1/relabel"})


@dataclass(frozen=True)
class KeySet:
    """The API keys of a service and their scopes."""

    keys: tuple[tuple[bytes, str], ...]

    @classmethod
    def load(cls, path: str | Path) -> KeySet:
        """Read a key file; every error names the line, never the key."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the API key file: {exc}") from exc
        keys = []
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1] not in SCOPES:
                raise ConfigError(f"{path}:{number}: expected 'KEY SCOPE' with scope read or write")
            keys.append((parts[0].encode(), parts[1]))
        if not keys:
            raise ConfigError(f"{path}: no API keys")
        return cls(tuple(keys))

    def scope(self, key: str) -> str | None:
        """The scope of ``key``, or ``None``. Every stored key is compared, each in constant
        time, so the time taken says nothing about which key (or how much of it) matched."""
        given = key.encode()
        found = None
        for stored, scope in self.keys:
            if hmac.compare_digest(stored, given):
                found = scope
        return found


def required_scope(path: str) -> str | None:
    """The scope a request to ``path`` needs (``None``: open)."""
    if path in OPEN_PATHS:
        return None
    return "write" if path in WRITE_PATHS else "read"


class BearerAuth:
    """ASGI middleware: 401 without a known ``Authorization: Bearer KEY``, 403 when the key's
    scope does not cover the path."""

    def __init__(self, app: Any, keys: KeySet) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = required_scope(scope["path"])
        if needed is None:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        kind, _, key = header.partition(" ")
        granted = self.keys.scope(key.strip()) if kind.lower() == "bearer" else None
        if granted is None:
            detail = "missing or unknown API key (Authorization: Bearer KEY)"
            await send_problem(send, 401, detail, [(b"www-authenticate", b"Bearer")])
        elif needed not in _GRANTS[granted]:
            detail = f"this API key's scope ({granted}) does not allow {needed}"
            await send_problem(send, 403, detail)
        else:
            await self.app(scope, receive, send)
