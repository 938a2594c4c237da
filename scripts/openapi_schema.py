"""The Cog OpenAPI document of a predictor, as `cog build` writes it to `.cog/openapi_schema.json`.

A build step, not part of the runtime (`scripts/write_openapi_schema.py` runs it; nothing in `flux_day/`
or `predict.py` imports it), and the one place that reads cog's private inspector: tests and benchmarks
call `read_predictor` here.

Cog's server (coglet) checks every request's input against `components.schemas.Input` of that file, and
serves the file at `/openapi.json`; without it the server accepts any input. Outside a built image
nothing writes it, so this module builds the same document from cog's own reading of `predict.py`
(`cog._inspector`), following Cog's Go generator (`pkg/schema/openapi_spec.go` in replicate/cog): one
property per input with `x-order`, choices as a component schema of their own referenced through
`allOf`, optional inputs `nullable`, and the fixed request, response and error components and paths.

The inspector cannot tell `Input(default=None)` from no default at all, nor does it report `accept=`:
an optional input is written with `"default": null` (as Cog writes `Input(default=None)`, the way
`predict.py` declares every optional input), and `accept` is not written.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import cog
from cog import _inspector
from cog._adt import InputField, PredictorInfo, Repetition

SCHEMA_PATH = Path(".cog") / "openapi_schema.json"

STATUS = ["starting", "processing", "succeeded", "canceled", "failed"]


def read_predictor(root: Path, module: str = "predict", class_name: str = "Predictor") -> PredictorInfo:
    """Cog's own reading of the predictor's inputs and output, as its server reads them at startup."""
    sys.path.insert(0, str(root))
    try:
        return _inspector.create_predictor(module, class_name)
    finally:
        sys.path.remove(str(root))


def title_case(name: str) -> str:
    """`num_outputs` -> `Num Outputs`: Cog's titles (only first letters change, as Go's TitleCase)."""
    return " ".join(part[:1].upper() + part[1:] for part in name.split("_"))


def json_number(value: Any) -> Any:
    """A whole float as an int: Go writes 3.0 as `3`, so `cog build` never writes `3.0`."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def is_optional(field: InputField) -> bool:
    """`T | None`: Cog marks it nullable and never requires it."""
    return field.type.repetition in (Repetition.OPTIONAL, Repetition.OPTIONAL_REPEATED)


def is_required(field: InputField) -> bool:
    """Required as Cog decides it: not optional, and no default other than None."""
    return not is_optional(field) and field.default is None


def input_property(field: InputField) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One input's property, and the enum component its choices need (None when it has none)."""
    if isinstance(field.default, dataclasses.Field):
        raise ValueError(
            f"input {field.name}: default_factory cannot be written to a schema (Cog refuses it)"
        )
    nullable = is_optional(field)
    json_type = field.type.json_type()
    enum = None
    prop: dict[str, Any] = {"x-order": field.order}
    if field.choices:
        # Cog names the enum component after the input and leaves type and title to it.
        enum = {
            "title": field.name,
            "description": "An enumeration.",
            "enum": [json_number(choice) for choice in field.choices],
            "type": json_type.get("type", "string"),
        }
        prop["allOf"] = [{"$ref": f"#/components/schemas/{field.name}"}]
    else:
        prop["title"] = title_case(field.name)
        prop |= json_type
    # A None default on a non-optional input means "no default" to Cog (the input is required); on an
    # optional one it is the default, written as null.
    if field.default is not None or nullable:
        prop["default"] = json_number(field.default)
    if nullable:
        prop["nullable"] = True
    constraints = {
        "description": field.description,
        "minimum": json_number(field.ge),
        "maximum": json_number(field.le),
        "minLength": field.min_length,
        "maxLength": field.max_length,
        "pattern": field.regex,
        "deprecated": field.deprecated or None,
    }
    prop |= {key: value for key, value in constraints.items() if value is not None}
    return prop, enum


def openapi_document(info: PredictorInfo, version: str = cog.__version__) -> dict[str, Any]:
    """The whole OpenAPI 3.0.2 document `cog build` writes for a predictor (predict mode)."""
    fields = sorted(info.inputs.values(), key=lambda field: field.order)
    properties: dict[str, Any] = {}
    enums: dict[str, Any] = {}
    for field in fields:
        properties[field.name], enum = input_property(field)
        if enum is not None:
            enums[field.name] = enum
    input_schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": properties}
    required = [field.name for field in fields if is_required(field)]
    if required:
        input_schema["required"] = required
    schemas = {
        "Input": input_schema,
        "Output": info.output.json_type(),
        **enums,
        **prediction_components(),
        **validation_components(),
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": version},
        "paths": fixed_paths(),
        "components": {"schemas": schemas},
    }


def prediction_components() -> dict[str, Any]:
    """The request, response and status components, the same for every predictor."""
    string = {"type": "string"}
    timestamp = {"type": "string", "format": "date-time"}
    return {
        "PredictionRequest": {
            "title": "PredictionRequest",
            "type": "object",
            "properties": {
                "id": {"title": "Id", **string},
                "input": {"$ref": "#/components/schemas/Input"},
            },
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "properties": {
                "input": {"$ref": "#/components/schemas/Input"},
                "output": {"$ref": "#/components/schemas/Output"},
                "id": {"title": "Id", **string},
                "version": {"title": "Version", **string},
                "created_at": {"title": "Created At", **timestamp},
                "started_at": {"title": "Started At", **timestamp},
                "completed_at": {"title": "Completed At", **timestamp},
                "status": {"title": "Status", **string},
                "error": {"title": "Error", **string},
                "logs": {"title": "Logs", **string},
                "metrics": {"title": "Metrics", "type": "object"},
            },
        },
        "Status": {"title": "Status", "description": "An enumeration.", "enum": STATUS, "type": "string"},
    }


def validation_components() -> dict[str, Any]:
    """The components of a 422 answer (FastAPI's validation error), the same for every predictor."""
    return {
        "HTTPValidationError": {
            "title": "HTTPValidationError",
            "type": "object",
            "properties": {
                "detail": {
                    "title": "Detail",
                    "type": "array",
                    "items": {"$ref": "#/components/schemas/ValidationError"},
                }
            },
        },
        "ValidationError": {
            "title": "ValidationError",
            "required": ["loc", "msg", "type"],
            "type": "object",
            "properties": {
                "loc": {
                    "title": "Location",
                    "type": "array",
                    "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
                "msg": {"title": "Message", "type": "string"},
                "type": {"title": "Error Type", "type": "string"},
            },
        },
    }


def json_response(schema: dict[str, Any], description: str = "Successful Response") -> dict[str, Any]:
    """A response carrying JSON of `schema`, as Cog describes each of its routes' answers."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def fixed_paths() -> dict[str, Any]:
    """`/`, `/health-check`, `POST /predictions` and its cancel route, as Cog describes them."""
    validation_error = json_response({"$ref": "#/components/schemas/HTTPValidationError"}, "Validation Error")
    return {
        "/": {
            "get": {"summary": "Root", "operationId": "root__get", "responses": {"200": json_response({})}}
        },
        "/health-check": {
            "get": {
                "summary": "Healthcheck",
                "operationId": "healthcheck_health_check_get",
                "responses": {"200": json_response({})},
            }
        },
        "/predictions": {
            "post": {
                "summary": "Predict",
                "description": "Run a single prediction on the model",
                "operationId": "predict_predictions_post",
                "requestBody": {
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}
                    }
                },
                "responses": {
                    "200": json_response({"$ref": "#/components/schemas/PredictionResponse"}),
                    "422": validation_error,
                },
            }
        },
        "/predictions/{prediction_id}/cancel": {
            "post": {
                "summary": "Cancel",
                "operationId": "cancel_predictions__prediction_id__cancel_post",
                "parameters": [
                    {
                        "required": True,
                        "schema": {"title": "Prediction Id", "type": "string"},
                        "name": "prediction_id",
                        "in": "path",
                    }
                ],
                "responses": {"200": json_response({}), "422": validation_error},
            }
        },
    }


def write_openapi_schema(root: Path, path: Path | None = None) -> Path:
    """Write the document of `root`'s `predict.py:Predictor` to `path` (default `root/.cog/...`)."""
    path = path or root / SCHEMA_PATH
    document = openapi_document(read_predictor(root))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole or not at all, as Cog does: a server starting meanwhile never reads half a file
    # (it would run without validation).
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    partial.replace(path)
    return path
