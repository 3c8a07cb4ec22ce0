"""OpenAI-format errors: one exception type, and handlers that turn everything into that body."""

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from settings.logfields import STORE_DOWN
from workers.protocol import ErrorBody

log = logging.getLogger("freeference.api")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    """An error the caller should see, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type_: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(
            message=message,
            type=type_ or _TYPE_BY_STATUS.get(status, "api_error"),
            param=param,
            code=code,
        )
        self.headers = dict(headers or {})


def invalid_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, code="invalid_request_error", param=param)


# Anthropic's Messages API callers get Anthropic's error format (api/dialects/messages.py): the
# body {"type": "error", "error": {"type", "message"}} and its error types. 503 becomes 529
# overloaded_error, which Anthropic's clients retry as they retry Anthropic's own overload.
# Source: https://docs.anthropic.com/en/api/errors ("HTTP errors", "Error shapes")
ANTHROPIC_PATH_PREFIX = "/v1/messages"
_ANTHROPIC_TYPE_BY_STATUS = {
    401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "request_too_large",
    429: "rate_limit_error", 529: "overloaded_error",
}
ANTHROPIC_OVERLOADED = 529


def anthropic_error(status: int, body: ErrorBody) -> tuple[int, dict[str, object]]:
    """(status, body) of an error in Anthropic's format."""
    status = ANTHROPIC_OVERLOADED if status == 503 else status
    # Other 4xx are invalid_request_error, other 5xx api_error, as Anthropic's own.
    kind = _ANTHROPIC_TYPE_BY_STATUS.get(status, "invalid_request_error" if status < 500 else "api_error")
    return status, {"type": "error", "error": {"type": kind, "message": body.message}}


def error_response(status: int, body: ErrorBody, headers: Mapping[str, str] | None = None,
                   path: str = "") -> JSONResponse:
    """The error answer, in the format of the API the path belongs to (OpenAI's unless Anthropic's)."""
    if path.startswith(ANTHROPIC_PATH_PREFIX):
        status, content = anthropic_error(status, body)
        return JSONResponse(content, status_code=status, headers=dict(headers or {}))
    return JSONResponse({"error": body.model_dump()}, status_code=status, headers=dict(headers or {}))


def _location(loc: tuple[int | str, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    if not parts:
        return None
    out = parts[0]
    for part in parts[1:]:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


async def _openai_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OpenAIError)
    return error_response(exc.status, exc.body, exc.headers, request.url.path)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = _location(tuple(first.get("loc", ())))
    message = f"Invalid value for '{param}': {first['msg']}" if param else str(first["msg"])
    return error_response(400, ErrorBody(message=message, type="invalid_request_error", param=param,
                                         code="invalid_request_error"), path=request.url.path)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {400: "invalid_request_error", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if isinstance(exc.__cause__, RecursionError):  # FastAPI's JSON parse of a body nested past Python's stack
        message = "The JSON is nested too deeply."
    return error_response(
        exc.status_code,
        ErrorBody(message=message, type=_TYPE_BY_STATUS.get(exc.status_code, "api_error"), code=code),
        exc.headers, request.url.path,
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log (without the request body); the caller gets a generic body.
    log.error("unhandled error on %s %s", request.method, request.url.path[:200], exc_info=exc)
    return error_response(
        500, ErrorBody(message="Internal server error", type="api_error", code="internal_error"),
        path=request.url.path)


def store_unavailable() -> OpenAIError:
    """Redis is restarting or unreachable: a retryable 503."""
    return OpenAIError(503, "The gateway's data store is unavailable; please retry.", code="store_unavailable",
                       headers={"Retry-After": "2"})


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # Not a 500 with a traceback.
    log.warning("redis unavailable on %s %s (%s)", request.method, request.url.path[:200], type(exc).__name__,
                extra=STORE_DOWN)
    error = store_unavailable()
    return error_response(error.status, error.body, error.headers, request.url.path)


async def _client_left(request: Request, exc: Exception) -> Response:
    # The caller hung up before its body was complete, or the edge answered 413 / 408 in the
    # app's place (api/middleware.py, which logs the first): nobody to answer, nothing wrong here.
    return Response(status_code=499)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can raise leaves as an OpenAI error body."""
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(ClientDisconnect, _client_left)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisConnectionError, _store_unavailable)
    app.add_exception_handler(RedisTimeoutError, _store_unavailable)
    app.add_exception_handler(Exception, _unexpected)
