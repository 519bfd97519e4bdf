"""The OpenAPI document: the request bodies the handlers parse themselves, declared in it.

The handlers read their bodies by hand (size and depth limits before validation, see app.py), so
FastAPI cannot see the pydantic models and would publish endpoints without a body. This adds each
model's JSON schema as the endpoint's required ``application/json`` body, with the models it
refers to under ``components.schemas``, so /openapi.json describes the API clients really call
(and API fuzzers such as schemathesis generate real requests from it).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

_REF = "#/components/schemas/{model}"


def declare_request_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """Make ``app.openapi()`` declare ``bodies`` (path of a POST route -> its request model)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            keys, definitions = models_json_schema([(model, "validation") for model in bodies.values()],
                                                   ref_template=_REF)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(definitions.get("$defs", {}))
            for (path, model), key in zip(bodies.items(), keys.values()):
                document["paths"][path]["post"]["requestBody"] = {
                    "required": True, "content": {"application/json": {"schema": key}}}
                # the handlers answer 400 in OpenAI's error shape, never FastAPI's 422
                document["paths"][path]["post"].get("responses", {}).pop("422", None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
