"""The service's OpenAPI schema, told what the server checks beyond its models: the limits of
its settings, the length of a text the store takes, and whether its embedder reads images."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from icl_cl.service.serving import Serving
from icl_cl.service.settings import ServiceSettings


def describe_limits(app: FastAPI) -> None:
    """Write the service's limits into its OpenAPI schema, so that a request the schema allows
    is within them: inputs or examples per request (``max_items``), ``k`` (``max_k``) of a
    predict, a suggest or an audit and, once the store is open, a text's length (its config's
    ``max_text_chars``) and, when its embedder reads text only, inputs without images."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # cached by FastAPI: the limits below are written once
        settings: ServiceSettings = app.state.settings
        models = schema["components"]["schemas"]
        models["PredictRequest"]["properties"]["inputs"]["maxItems"] = settings.max_items
        models["LearnRequest"]["properties"]["examples"]["maxItems"] = settings.max_items
        _branch(models["PredictRequest"]["properties"]["k"], "integer")["maximum"] = settings.max_k
        models["SuggestRequest"]["properties"]["inputs"]["maxItems"] = settings.max_items
        _branch(models["SuggestRequest"]["properties"]["k"], "integer")["maximum"] = settings.max_k
        _branch(models["AuditRequest"]["properties"]["k"], "integer")["maximum"] = settings.max_k
        serving: Serving | None = getattr(app.state, "serving", None)
        if serving is not None:
            max_chars = serving.current.clf.config.max_text_chars
            _branch(models["PredictInput"]["properties"]["text"], "string")["maxLength"] = max_chars
            models["ExampleIn"]["properties"]["text"]["maxLength"] = max_chars
            if not serving.embedder.reads_images:
                _text_only(models["PredictInput"])
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _text_only(model: dict[str, Any]) -> None:
    """A predict input of a store whose embedder reads text only: an ``id`` and a ``text``
    (an image is refused with 422, as the schema then says: ``image`` may only be null)."""
    del model["oneOf"]
    model["properties"]["image"] = {"type": "null", "description": "this store reads text only"}
    model["properties"]["text"] = {
        **model["properties"]["text"],
        **_branch(model["properties"]["text"], "string"),
    }
    model["properties"]["text"].pop("anyOf", None)
    model["required"] = ["id", "text"]


def _branch(prop: dict[str, Any], kind: str) -> dict[str, Any]:
    """The part of a property's schema of JSON type ``kind`` (an optional one is an anyOf)."""
    return next((b for b in prop.get("anyOf", []) if b.get("type") == kind), prop)
