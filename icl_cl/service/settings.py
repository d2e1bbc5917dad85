"""The service's limits and batching settings (the classifier's own settings stay in its config)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServiceSettings(BaseModel):
    """Limits, micro-batching and timeouts of one service.

    The longest text accepted is the classifier config's ``max_text_chars``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(4 * 2**20, gt=0, description="larger request bodies get 413")
    max_items: int = Field(256, gt=0, description="inputs or examples per request; more get 422")
    max_k: int = Field(100, gt=0, description="largest k a predict may ask for")
    default_k: int = Field(
        10, gt=0, description="k of a predict that does not say, and of the refit"
    )
    max_queue_items: int = Field(4096, gt=0, description="inputs waiting; a fuller queue gets 429")
    max_pending_learns: int = Field(8, gt=0, description="learns waiting; more get 429")
    batch_wait_ms: float = Field(
        5.0, ge=0, description="how long a micro-batch waits for more predicts after the first"
    )
    max_batch_items: int = Field(128, gt=0, description="inputs per micro-batch")
    request_timeout_s: float = Field(
        60.0, gt=0, description="a request still running then gets 503"
    )
    read_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a request (headers and body) not received whole this long after its first "
        "byte, or a new connection with no whole request, is disconnected",
    )
    keep_alive_s: float = Field(
        5.0, gt=0, description="an idle keep-alive connection is closed after this (uvicorn's)"
    )
