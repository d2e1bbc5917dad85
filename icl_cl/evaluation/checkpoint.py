"""Per-(method, session) results saved as they finish, so a killed run skips finished cells."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from icl_cl.errors import ConfigError
from icl_cl.memory.store import write_atomic

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"


def fingerprint(value: Any) -> str:
    """A short, stable hash of a JSON-serialisable value."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Checkpoint:
    """``checkpoint.json`` in a run folder: the run's data fingerprint and finished cells.

    A cell is one method evaluated after one session. It is reused only while its own
    fingerprint (method spec, effective classifier config, k, test budget) is unchanged. The
    run fingerprint covers what the learned store depends on (data, session split, embedder);
    a folder made under another one is refused rather than silently mixed.
    """

    def __init__(self, out_dir: Path, run_fingerprint: str, fresh: bool = False) -> None:
        self.path = out_dir / CHECKPOINT
        self.run_fingerprint = run_fingerprint
        self.data: dict[str, Any] = {"run": run_fingerprint, "cells": {}, "extra": {}}
        if self.path.exists() and not fresh:
            try:
                stored = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"{self.path}: unreadable checkpoint ({exc}); use --fresh"
                ) from exc
            if stored.get("run") != run_fingerprint:
                raise ConfigError(
                    f"{out_dir}: this run folder was made with another dataset, session split or "
                    "embedder; pick another --out, or pass --fresh to start it over"
                )
            self.data = stored
            self.data.setdefault("extra", {})

    @staticmethod
    def key(method: str, session: int) -> str:
        return f"{method}@{session}"

    def get(self, method: str, session: int, cell_fingerprint: str) -> dict[str, Any] | None:
        cell = self.data["cells"].get(self.key(method, session))
        if cell is None or cell.get("fingerprint") != cell_fingerprint:
            return None
        return cell["result"]

    def put(self, method: str, session: int, cell_fingerprint: str, result: dict[str, Any]) -> None:
        self.data["cells"][self.key(method, session)] = {
            "fingerprint": cell_fingerprint,
            "result": result,
        }
        self._write()

    def get_extra(self, name: str, value_fingerprint: str) -> Any:
        entry = self.data["extra"].get(name)
        return (
            None if entry is None or entry["fingerprint"] != value_fingerprint else entry["value"]
        )

    def put_extra(self, name: str, value_fingerprint: str, value: Any) -> None:
        self.data["extra"][name] = {"fingerprint": value_fingerprint, "value": value}
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # tmp + fsync + rename: a kill leaves the previous checkpoint or this one, never half.
        write_atomic(self.path, json.dumps(self.data, indent=1, default=float).encode("utf-8"))
