"""The client of ``icl-cl serve`` (see :mod:`icl_cl.service.client`)."""

from __future__ import annotations

from icl_cl.service.client import Client, ServiceError

__all__ = ["Client", "ServiceError"]
