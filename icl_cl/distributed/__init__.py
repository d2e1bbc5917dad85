"""Scale-out on Ray: batch predict on Ray Data with an actor pool, and map-reduce learn (workers
embed shards and sum their statistics; the driver commits one session).

Ray is imported when these functions run, not when this package is imported.
"""

from __future__ import annotations

from icl_cl.distributed.learn import learn
from icl_cl.distributed.predict import predict, read_inputs
from icl_cl.distributed.runtime import connect

__all__ = ["connect", "learn", "predict", "read_inputs"]
