"""``icl-cl serve``: the service under uvicorn, with the checks made before it listens."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from icl_cl.config import ClassifierConfig
from icl_cl.errors import ConfigError
from icl_cl.service.auth import KeySet
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
    """
    import uvicorn

    from icl_cl.service.app import create_app

    settings = settings or ServiceSettings()
    keys = KeySet.load(api_key_file) if api_key_file is not None else None
    if keys is None:
        if not is_loopback(host):
            raise ConfigError(
                f"refusing to serve on {host} without --api-key-file: without keys the "
                "service binds to loopback only (127.0.0.1)"
            )
        logger.warning(
            "no --api-key-file: no authentication, so serving on loopback only (%s:%d)", host, port
        )
    else:
        logger.warning("serving on %s:%d with %d API keys", host, port, len(keys.keys))
    app = create_app(store, config, settings=settings, keys=keys)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=access_log,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
