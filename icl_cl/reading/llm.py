"""The classifier's LLM: built from its config on first use, and put behind the store's call
cache for work whose results are stored."""

from __future__ import annotations

from pathlib import Path

from icl_cl.backends.base import LLMBackend
from icl_cl.config import LLMConfig
from icl_cl.errors import ConfigError


class LLMHandle:
    """Holds the LLM backend of one classifier.

    Predictions use the backend as it is (they write nothing); fits and class summaries, which
    are stored, go through a call cache in the store (``llm.cache``), so a refit reads again only
    what it has not read.

    Args:
        cache_path: Where the store's call cache lives.
        backend: A backend to use as it is; its owner keeps it open (and no cache is added).
    """

    def __init__(self, cache_path: Path, backend: LLMBackend | None = None) -> None:
        self.cache_path = cache_path
        self._backend = backend
        self._owned = backend is None
        self._cached: LLMBackend | None = None

    def get(self, llm: LLMConfig | None) -> LLMBackend:
        """The backend of ``llm`` (created on first use)."""
        if llm is None:
            raise ConfigError("no LLM is configured (set 'llm' in the classifier config)")
        if self._backend is None:
            from icl_cl.backends.registry import create_backend

            self._backend = create_backend(llm.backend, model=llm.model, **llm.options)
        return self._backend

    def for_writing(self, llm: LLMConfig | None) -> LLMBackend:
        """The backend for work that is stored: behind the store's call cache when it is ours."""
        backend = self.get(llm)
        if not self._owned or llm is None or not llm.cache:
            return backend
        if self._cached is None:
            from icl_cl.backends.cache import CachedBackend

            self._cached = CachedBackend(backend, self.cache_path)
        return self._cached

    def clear_cache(self) -> None:
        """Empty the store's call cache (a forget or relabel: its entries were read from prompts
        that may hold the forgotten texts)."""
        from icl_cl.backends.cache import CachedBackend, clear_cache_file

        if isinstance(self._cached, CachedBackend):
            self._cached.clear()
        else:
            clear_cache_file(self.cache_path)

    def close(self) -> None:
        """Close the backend if it was built here (with the call cache, which closes it)."""
        opened = self._cached or self._backend
        if self._owned and opened is not None:
            opened.close()
        self._backend = self._cached = None
