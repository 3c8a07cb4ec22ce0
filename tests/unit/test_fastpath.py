"""api/fastpath.DirectRoute: the endpoint served directly, errors through the app's own handlers."""

import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from redis.exceptions import ConnectionError as RedisConnectionError

from api.errors import OpenAIError, install_error_handlers
from api.fastpath import DirectRoute

router = APIRouter()


@router.post("/v1/echo")
async def echo(request: Request) -> Response:
    """Answers with what the request asked for: a body, or one of the errors below."""
    body = await request.body()
    if body == b"refuse":
        raise OpenAIError(429, "Slow down.", code="rate_limit_exceeded", headers={"Retry-After": "3"})
    if body == b"store":
        raise RedisConnectionError("gone")
    if body == b"bug":
        raise ValueError("a bug")
    return JSONResponse({"echo": body.decode(), "route": request.scope["route"].path})


@router.get("/v1/echo")
async def echo_get() -> dict[str, str]:
    """The same path with another method goes through FastAPI's router."""
    return {"via": "router"}


def _client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    route = next(r for r in router.routes if isinstance(r, APIRoute) and "POST" in (r.methods or ()))
    app.add_middleware(DirectRoute, fastapi_app=app, routes=[route])
    app.include_router(router)
    return TestClient(app, raise_server_exceptions=False)


def test_the_route_is_served_with_its_route_in_scope() -> None:
    response = _client().post("/v1/echo", content=b"hi")
    assert response.json() == {"echo": "hi", "route": "/v1/echo"}
    assert _client().get("/v1/echo").json() == {"via": "router"}


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"refuse", 429, "rate_limit_exceeded"),
    (b"store", 503, "store_unavailable"),
    (b"bug", 500, "internal_error"),
])
def test_errors_leave_through_the_apps_handlers(body: bytes, status: int, code: str) -> None:
    response = _client().post("/v1/echo", content=body)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert "Traceback" not in response.text and "a bug" not in response.text
    if status == 429:
        assert response.headers["retry-after"] == "3"
