"""Backends by name: each name maps to ``"module:Class"``, imported only when asked for.

Heavy libraries (torch, vLLM) load only with the backend that needs them, and no backend module
imports this one, so naming a backend has no side effects.
"""

from __future__ import annotations

import importlib
from typing import Any

from icl_cl.backends.base import LLMBackend
from icl_cl.errors import ConfigError

BACKENDS: dict[str, str] = {
    "openai": "icl_cl.backends.openai:OpenAICompatBackend",
    "transformers": "icl_cl.backends.transformers:TransformersBackend",
    "vllm": "icl_cl.backends.vllm:VLLMBackend",
}
"""Backend name -> ``"module:Class"`` of its implementation."""


def available_backends() -> list[str]:
    """The names :func:`create_backend` accepts."""
    return sorted(BACKENDS)


def backend_class(name: str) -> type[LLMBackend]:
    """The class registered as ``name``, imported now.

    Raises:
        ConfigError: ``name`` is not a registered backend.
    """
    if name not in BACKENDS:
        raise ConfigError(
            f"unknown LLM backend {name!r}; available: {', '.join(available_backends())}"
        )
    module, _, attribute = BACKENDS[name].partition(":")
    cls: type[LLMBackend] = getattr(importlib.import_module(module), attribute)
    return cls


def create_backend(name: str, **options: Any) -> LLMBackend:
    """Build the backend registered as ``name`` with its options (model, ...)."""
    return backend_class(name)(**options)
