"""A persistent cache in front of any backend: a repeated evaluation makes zero model calls."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from icl_cl.backends.base import (
    BackendWrapper,
    Generation,
    GenerationParams,
    LLMBackend,
    OptionScores,
    Prompt,
    Usage,
    check_options,
    prompt_key,
)


def _key(*parts: object) -> str:
    return hashlib.sha256(
        json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()


def clear_calls(conn: sqlite3.Connection) -> None:
    """Delete every cached call and leave none of their bytes in the file or its log: a forget
    clears the cache, whose keys are digests of prompts that may hold the forgotten texts."""
    conn.execute("PRAGMA secure_delete = ON")
    conn.execute("DELETE FROM calls")
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def clear_cache_file(path: str | Path) -> None:
    """:func:`clear_calls` on the cache at ``path`` (nothing when there is none)."""
    if not Path(path).exists():
        return
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        if conn.execute("SELECT 1 FROM sqlite_schema WHERE name = 'calls'").fetchone():
            clear_calls(conn)
    finally:
        conn.close()


class CachedBackend(BackendWrapper):
    """Wraps a backend; ``score`` and deterministic ``generate`` results are kept in SQLite,
    keyed by backend, model, prompt and parameters. Sampled generations are never cached.

    A prompt is keyed by :func:`~icl_cl.backends.base.prompt_key`: its text, plus the digest of
    every image of an image prompt, so that equal text with other images is another call.
    """

    def __init__(self, inner: LLMBackend, path: str | Path) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
        )
        self.usage = Usage()

    def close(self) -> None:
        self._conn.close()
        self.inner.close()

    def clear(self) -> None:
        """Forget every cached call (see :func:`clear_calls`)."""
        with self._lock:
            clear_calls(self._conn)

    def _get(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(
                    self._conn.execute(
                        f"SELECT key, value FROM calls WHERE key IN ({marks})", chunk
                    )
                )
        return found

    def _put(self, rows: list[tuple[str, str]]) -> None:
        with self._lock:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR REPLACE INTO calls(key, value) VALUES (?, ?)", rows)
            self._conn.execute("COMMIT")

    def score(self, prompts: Sequence[Prompt], options: Sequence[Sequence[str]]) -> OptionScores:
        k = check_options(prompts, options)
        keys = [
            _key("score", self.name, self.model, prompt_key(p), list(o))
            for p, o in zip(prompts, options, strict=True)
        ]
        cached = self._get(keys)
        misses = [i for i, key in enumerate(keys) if key not in cached]
        fresh_rows = set(misses)
        usage = Usage(cached_calls=len(prompts) - len(misses))
        method, exact = "cache", True
        if misses:
            fresh = self.inner.score([prompts[i] for i in misses], [options[i] for i in misses])
            usage.add(fresh.usage)
            method, exact = fresh.method, fresh.exact
            rows = []
            for j, i in enumerate(misses):
                value = {
                    "logprobs": fresh.logprobs[j].tolist(),
                    "counts": fresh.token_counts[j].tolist(),
                    "exact": fresh.exact,
                    "method": fresh.method,
                }
                cached[keys[i]] = json.dumps(value)
                rows.append((keys[i], cached[keys[i]]))
            self._put(rows)
        values = [json.loads(cached[key]) for key in keys]
        exact = exact and all(v["exact"] for v in values)
        self.usage.add(usage)
        return OptionScores(
            logprobs=np.array([v["logprobs"] for v in values], dtype=np.float64).reshape(
                len(prompts), k
            ),
            token_counts=np.array([v["counts"] for v in values], dtype=np.int64).reshape(
                len(prompts), k
            ),
            exact=exact,
            method=method if misses else values[0]["method"] if values else "cache",
            usage=usage,
            cached=np.array([i not in fresh_rows for i in range(len(keys))]),
        )

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        if params.temperature > 0:
            return self.inner.generate(prompts, params)
        keys = [
            _key("generate", self.name, self.model, prompt_key(p), asdict(params)) for p in prompts
        ]
        cached = self._get(keys)
        misses = [i for i, key in enumerate(keys) if key not in cached]
        usage = Usage(cached_calls=len(prompts) - len(misses))
        if misses:
            before = Usage(**asdict(getattr(self.inner, "usage", Usage())))
            fresh = self.inner.generate([prompts[i] for i in misses], params)
            after = getattr(self.inner, "usage", None)
            if after is not None:
                usage.add(
                    Usage(**{f: getattr(after, f) - getattr(before, f) for f in asdict(before)})
                )
            rows = []
            for j, i in enumerate(misses):
                cached[keys[i]] = json.dumps(asdict(fresh[j]))
                rows.append((keys[i], cached[keys[i]]))
            self._put(rows)
        self.usage.add(usage)
        out = []
        for key in keys:
            v = json.loads(cached[key])
            out.append(
                Generation(
                    v["text"],
                    tuple(v["token_logprobs"]),
                    v["prompt_tokens"],
                    v["completion_tokens"],
                )
            )
        return out
