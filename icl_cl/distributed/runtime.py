"""Joining Ray, and turning what Ray raises into the library's errors."""

from __future__ import annotations

import logging
import os
from typing import Any

from icl_cl.errors import ConfigError, IclClError

logger = logging.getLogger(__name__)

INSTALL_HINT = "the ray engine needs Ray Data: pip install icl-cl[ray]"


def ray_module() -> Any:
    """``ray``, imported now; a clear error when it is not installed."""
    try:
        import ray
        import ray.data  # Ray Data is a separate extra of Ray
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    return ray


def connect(address: str | None = None, **init_options: Any) -> None:
    """Join the Ray cluster at ``address`` (default: ``RAY_ADDRESS``), or start Ray locally.

    Does nothing when this process is already connected. ``init_options`` go to ``ray.init``
    (e.g. ``num_cpus`` for a local Ray).
    """
    ray = ray_module()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    logger.info("connecting to Ray at %s", address or "a new local instance")
    ray.init(address=address, logging_level=logging.WARNING, **init_options)


def unwrapped(exc: BaseException) -> BaseException:
    """The library error a Ray task raised, if that is what ``exc`` carries; else ``exc``."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, IclClError) else exc
