"""The OpenAPI document, made to describe what the gateway really answers.

FastAPI's generated document lists a 422 the gateway never sends (every error is an OpenAI
error body, 400 for a bad request) and none of the errors it does send; and request schemas
given through `openapi_extra` keep pydantic's local `#/$defs/...` references, which do not
resolve inside an OpenAPI document. This module fixes both once, when the document is built,
so clients and fuzzers (tests/integration/test_fuzz_openapi.py) can trust it.
"""

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from api.errors import ANTHROPIC_OVERLOADED, ANTHROPIC_PATH_PREFIX
from workers.protocol import ErrorBody

_COMPONENTS = "#/components/schemas/"
_ERROR_REF = {"$ref": _COMPONENTS + "ErrorResponse"}
_DESCRIPTIONS = {
    400: "Malformed JSON, schema violation or context too long",
    401: "Missing, unknown or revoked key",
    403: "The key's tier does not allow this",
    404: "Unknown model, file, batch or key",
    413: "Request body over the configured limit",
    429: "The caller's own limits (Retry-After says when to retry)",
    502: "Every eligible upstream failed",
    503: "No model or worker available, data store down, or this process is full (Retry-After)",
    529: "Anthropic's overloaded_error: what OpenAI-format paths answer as 503",
    504: "The request exceeded its deadline",
}
# Errors any authenticated route can answer; the completion routes add the upstream ones.
_API_ERRORS = (400, 401, 403, 404, 413, 429, 503)
_CHAT_ERRORS = (*_API_ERRORS, 502, 504)
_COMPLETION_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/embeddings")
# Anthropic's error envelope and statuses on the /v1/messages paths (api/errors.anthropic_error).
_ANTHROPIC_ERROR_REF = {"$ref": _COMPONENTS + "AnthropicErrorResponse"}
_ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"type": "string", "enum": ["error"]},
    "error": {"type": "object", "required": ["type", "message"],
              "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}}


_READINESS = {"type": "object", "properties": {"status": {"type": "string"}, "redis": {"type": "boolean"},
                                               "workers": {"type": "integer"}}}
# Answers the route code builds by hand (no response_model), described here.
def _answer(description: str) -> dict[str, Any]:
    # One SSE event: `data` is a chunk or event of the dialect, an in-band error, or [DONE].
    return {"200": {"description": description, "content": {
        "application/json": {"schema": {"type": "object"}},
        "text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                         "properties": {"data": {"type": "string"}}}}}}}


_EXTRA_RESPONSES: dict[tuple[str, str], dict[str, Any]] = {
    ("/v1/chat/completions", "post"): _answer(
        "A chat.completion object, or an SSE stream of chat.completion.chunk when stream is true"),
    ("/v1/responses", "post"): _answer("A response object, or an SSE stream of Responses events when stream is true"),
    ("/v1/messages", "post"): _answer("A message object, or an SSE stream of Messages events when stream is true"),
    ("/v1/embeddings", "post"): {"200": {"description": "A list of embedding objects (floats, or base64 when asked)",
                                         "content": {"application/json": {"schema": {"type": "object"}}}}},
    ("/readyz", "get"): {
        "200": {"description": "Ready", "content": {"application/json": {"schema": _READINESS}}},
        "503": {"description": "Not ready: Redis, the reply channel or every worker is down",
                "content": {"application/json": {"schema": _READINESS}}}},
}


class ErrorResponse(BaseModel):
    """The OpenAI error envelope every failure uses."""

    error: ErrorBody


def _errors_for(path: str) -> tuple[int, ...]:
    if path in _COMPLETION_PATHS:
        return _CHAT_ERRORS
    if path.startswith(("/v1/", "/admin/")):
        return _API_ERRORS
    return ()


def _hoist_defs(node: Any, components: dict[str, Any]) -> Any:
    """Move nested pydantic `$defs` into components and point their references there."""
    if isinstance(node, dict):
        for name, definition in node.pop("$defs", {}).items():
            components.setdefault(name, _hoist_defs(definition, components))
        return {k: (v.replace("#/$defs/", _COMPONENTS) if k == "$ref" and isinstance(v, str)
                    else _hoist_defs(v, components)) for k, v in node.items()}
    if isinstance(node, list):
        return [_hoist_defs(item, components) for item in node]
    return node


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document with real error responses and resolvable schemas (cached)."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})
    document["paths"] = _hoist_defs(document["paths"], components)
    components["ErrorResponse"] = _hoist_defs(ErrorResponse.model_json_schema(ref_template=_COMPONENTS + "{model}"),
                                              components)
    components["AnthropicErrorResponse"] = _ANTHROPIC_ERROR
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.update(_EXTRA_RESPONSES.get((path, method), {}))
            anthropic = path.startswith(ANTHROPIC_PATH_PREFIX)
            if responses.pop("422", None) is not None:  # FastAPI's validation error: sent as a 400 instead
                responses.setdefault("400", _error_response(400, anthropic))
            for status in _errors_for(path):
                if anthropic and status == 503:
                    status = ANTHROPIC_OVERLOADED
                responses.setdefault(str(status), _error_response(status, anthropic))
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = document
    return document


def _error_response(status: int, anthropic: bool = False) -> dict[str, Any]:
    schema = _ANTHROPIC_ERROR_REF if anthropic else _ERROR_REF
    return {"description": _DESCRIPTIONS.get(status, "Error"), "content": {"application/json": {"schema": schema}}}


def install_openapi(app: FastAPI) -> None:
    """Serve build_openapi() at /openapi.json."""

    def openapi() -> dict[str, Any]:
        return build_openapi(app)

    app.openapi = openapi  # type: ignore[method-assign]
