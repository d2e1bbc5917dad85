"""What later steps compute from a store's examples and keep in it, outside any session: fitted
parameters (kept heads, the scorer choice, an embedder's centring) and the LLM's class summaries.

Each is a keyed row saved in its own transaction and sealed with it, so a save is all or nothing;
fitted parameters are read checked against their seals (predictions use them). Module functions
over the store's connection, called by :class:`~icl_cl.memory.store.Store`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from icl_cl.memory.checksums import seal
from icl_cl.memory.store_files import transaction
from icl_cl.memory.store_reads import sealed_rows


def fitted(
    conn: sqlite3.Connection, path: Path, key: str, *, check: bool = True
) -> tuple[dict[str, Any], int] | None:
    """The parameters fitted under ``key`` and the example count they were fitted at."""
    rows = sealed_rows(conn, path, "fitted", [key], check=check)
    return (json.loads(rows[0]["value"]), int(rows[0]["n_examples"])) if rows else None


def fitted_keys(conn: sqlite3.Connection, prefix: str) -> list[str]:
    """Keys of the stored fitted parameters that start with ``prefix``."""
    rows = conn.execute(
        "SELECT key FROM fitted WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix)
    )
    return [key for (key,) in rows]


def save_fitted(conn: sqlite3.Connection, key: str, value: dict[str, Any], n_examples: int) -> None:
    """Save (or replace) the parameters under ``key``, fitted at ``n_examples`` examples."""
    with transaction(conn):
        conn.execute(
            "INSERT OR REPLACE INTO fitted(key, value, n_examples) VALUES (?, ?, ?)",
            (key, json.dumps(value, sort_keys=True), n_examples),
        )
        seal(conn, "fitted", [key])


def summaries(conn: sqlite3.Connection) -> dict[str, str]:
    """InCA class summaries written by the LLM, by label."""
    return dict(conn.execute("SELECT label, summary FROM summaries"))


def save_summaries(conn: sqlite3.Connection, summaries: dict[str, str], model: str) -> None:
    """Save (or replace) class summaries by label, written by ``model`` now."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with transaction(conn):
        conn.executemany(
            "INSERT OR REPLACE INTO summaries(label, summary, model, created_at) VALUES (?, ?, ?, ?)",
            [(label, text, model, now) for label, text in summaries.items()],
        )
        seal(conn, "summaries", list(summaries))
