"""The served OpenAPI document: FastAPI's, corrected to what this server really answers.

Two things only the running server knows or does differently from FastAPI's defaults: validation errors are
400 (not FastAPI's 422 with its own body), and ``model`` accepts only the names this process serves (any other
gets 404). With both stated, a schema-driven fuzzer's valid requests reach the engine, and its checks of status
codes and bodies against the document are exact.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi


def install_openapi(app: FastAPI, model_names: list[str]) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes)
            _drop_validation_422(document)
            _pin_model_names(document, model_names)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi


def _drop_validation_422(document: dict[str, Any]) -> None:
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _pin_model_names(document: dict[str, Any], model_names: list[str]) -> None:
    schemas = document.get("components", {}).get("schemas", {})
    for name, schema in schemas.items():
        model = schema.get("properties", {}).get("model")
        if name.endswith("Request") and model is not None and model.get("type") == "string":
            model["enum"] = list(model_names)
