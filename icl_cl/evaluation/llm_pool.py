"""LLM backends of a run: one per distinct LLM config, behind one call cache in the run folder."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from icl_cl.backends.base import (
    BackendWrapper,
    Generation,
    GenerationParams,
    LLMBackend,
    OptionScores,
)
from icl_cl.config import LLMConfig

BackendFactory = Callable[[LLMConfig], LLMBackend]
"""Builds a backend for an LLM config; the default goes through the backend registry."""

LLM_CACHE = "llm_cache.sqlite"


def registry_factory(llm: LLMConfig) -> LLMBackend:
    from icl_cl.backends.registry import create_backend

    return create_backend(llm.backend, model=llm.model, **llm.options)


class SharedBackend(BackendWrapper):
    """A backend lent to many classifiers: ``close`` is left to the pool, and every prompt asked
    for is counted (``requests``, cache hits included: the cost a method would have without our
    cache)."""

    def __init__(self, inner: LLMBackend) -> None:
        super().__init__(inner)
        self.requests = 0

    def score(self, prompts: Sequence[str], options: Sequence[Sequence[str]]) -> OptionScores:
        self.requests += len(prompts)
        return self.inner.score(prompts, options)

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generation]:
        self.requests += len(prompts)
        return self.inner.generate(prompts, params)

    def close(self) -> None:
        """Borrowed: the pool closes the real backend."""


class BackendPool:
    """Creates each LLM once (loading a model is slow) and puts the run's call cache in front."""

    def __init__(self, out_dir: Path, factory: BackendFactory | None = None) -> None:
        self.cache_path = out_dir / LLM_CACHE
        self.factory = factory or registry_factory
        self._backends: dict[str, SharedBackend] = {}

    def get(self, llm: LLMConfig) -> SharedBackend:
        key = json.dumps(llm.model_dump(mode="json"), sort_keys=True)
        if key not in self._backends:
            from icl_cl.backends.cache import CachedBackend

            backend = self.factory(llm)
            if llm.cache:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                backend = CachedBackend(backend, self.cache_path)
            self._backends[key] = SharedBackend(backend)
        return self._backends[key]

    def usage(self) -> dict[str, Any]:
        """Prompts asked for by this run and model calls actually made (cache misses)."""
        requests = sum(b.requests for b in self._backends.values())
        cached = sum(
            b.inner.usage.cached_calls for b in self._backends.values() if hasattr(b.inner, "usage")
        )
        return {"requests": requests, "model_calls": requests - cached}

    def close(self) -> None:
        for b in self._backends.values():
            b.inner.close()
        self._backends.clear()
