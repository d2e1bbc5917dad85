"""``icl-cl serve``: the service under uvicorn, with the checks made before it listens."""

from __future__ import annotations

import copy
import ipaddress
import logging
import logging.config
from pathlib import Path
from typing import Any

from icl_cl.config import ClassifierConfig
from icl_cl.errors import ConfigError
from icl_cl.service.auth import KeySet
from icl_cl.service.protocol import timed_protocol
from icl_cl.service.settings import ServiceSettings

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def uvicorn_options(settings: ServiceSettings) -> dict[str, Any]:
    """The timeouts of ``settings`` as ``uvicorn.Config`` keyword arguments: the protocol's
    read deadline, the keep-alive timeout, and a graceful shutdown bounded by the request
    timeout (the requests in flight finish, or get 503, before it ends)."""
    return {
        "http": timed_protocol(settings.read_timeout_s),
        "timeout_keep_alive": settings.keep_alive_s,
        "timeout_graceful_shutdown": int(settings.request_timeout_s) + 5,
    }


def log_config() -> dict[str, Any]:
    """uvicorn's logging, with the service's own messages (start-up, refits, shutdown) at INFO
    beside uvicorn's, or quieter when the caller's logging is (``-q``)."""
    from uvicorn.config import LOGGING_CONFIG

    root = logging.getLogger().getEffectiveLevel()
    level = min(root, logging.INFO) if root <= logging.WARNING else root
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["icl_cl"] = {
        "handlers": ["default"],
        "level": logging.getLevelName(level),
        "propagate": False,
    }
    return config


def serve(
    store: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key_file: str | Path | None = None,
    config: ClassifierConfig | None = None,
    settings: ServiceSettings | None = None,
    access_log: bool = False,
) -> None:
    """Serve ``store`` until SIGTERM or SIGINT, which drain the requests in flight.

    uvicorn takes uvloop and httptools when they are installed (the ``serve`` extra has them).

    Raises:
        ConfigError: No key file for a host other than loopback, or an unreadable key file.
        StoreError: The store cannot be served (``StoreCorruptError``: it is damaged).
    """
    import uvicorn

    from icl_cl.service.app import create_app, open_store

    settings = settings or ServiceSettings()
    keys = KeySet.load(api_key_file) if api_key_file is not None else None
    if keys is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {host} without --api-key-file: without keys the "
            "service binds to loopback only (127.0.0.1)"
        )
    logging_config = log_config()
    logging.config.dictConfig(logging_config)  # now, so that the lines below show as well
    if keys is None:
        logger.info(
            "serving %s on %s:%d without authentication (no --api-key-file: loopback only)",
            store,
            host,
            port,
        )
    else:
        logger.info("serving %s on %s:%d with %d API keys", store, host, port, len(keys.keys))
    app = create_app(store, config, settings=settings, keys=keys)
    open_store(app)  # a damaged store: one error line and its exit code, never a traceback
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        log_config=logging_config,
        access_log=access_log,
        **uvicorn_options(settings),
    )
