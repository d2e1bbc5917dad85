"""Backends register under a name; configs pick them by that name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from icl_cl.backends.base import LLMBackend
from icl_cl.errors import ConfigError

_FACTORIES: dict[str, Callable[..., LLMBackend]] = {}


def register_backend(name: str) -> Callable[[Callable[..., LLMBackend]], Callable[..., LLMBackend]]:
    """Class decorator: make a backend constructible by ``name``."""

    def wrap(factory: Callable[..., LLMBackend]) -> Callable[..., LLMBackend]:
        _FACTORIES[name] = factory
        return factory

    return wrap


def _load_builtin() -> None:
    # Imported here so that heavy libraries load only when a backend is asked for.
    import icl_cl.backends.openai_compat
    import icl_cl.backends.transformers
    import icl_cl.backends.vllm  # noqa: F401


def available_backends() -> list[str]:
    _load_builtin()
    return sorted(_FACTORIES)


def create_backend(name: str, **options: Any) -> LLMBackend:
    """Build the backend registered as ``name`` with its options (model, ...)."""
    _load_builtin()
    if name not in _FACTORIES:
        raise ConfigError(
            f"unknown LLM backend {name!r}; available: {', '.join(sorted(_FACTORIES))}"
        )
    return _FACTORIES[name](**options)
