"""The chat route without FastAPI's routing layers: the innermost middleware serves it directly.

`POST /v1/chat/completions` is nearly every request the gateway sees, and the endpoint takes
its own request apart (no dependencies, no FastAPI body parsing). Between our middlewares and
the endpoint FastAPI still ran its exception middleware, its exit-stack middleware, the match
of the path against every route, the route's request/response wrapper and its dependency
solving: a few hundred microseconds on this machine per request (docs/performance.md). This
middleware sits innermost and calls the endpoint itself; everything else goes through FastAPI
as before. The route stays registered, so the OpenAPI schema and every other caller of the
app see it unchanged, and errors leave through the same handlers the app installs.
"""

from collections.abc import Awaitable, Callable

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send


class DirectRoute:
    """Pure ASGI: serves `route` by calling its endpoint, rendering errors with the app's handlers."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI, route: APIRoute) -> None:
        self.app = app
        self._fastapi_app = fastapi_app
        self._route = route
        self._methods = frozenset(route.methods or ())
        self._endpoint: Callable[[Request], Awaitable[Response]] = route.endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self._route.path or scope["method"] not in self._methods:
            await self.app(scope, receive, send)
            return
        scope["route"] = self._route  # as FastAPI's router sets it (metrics label by its template)
        request = Request(scope, receive, send)
        try:
            response = await self._endpoint(request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise  # the server-error middleware answers 500 with the app's handler, as for any route
            response = await handler(request, exc)
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Callable[[Request, Exception], Awaitable[Response]] | None:
        # The handler FastAPI's exception middleware would pick: the nearest class in the MRO.
        # Exception's own handler is not used here: that one belongs to the server-error middleware.
        handlers = self._fastapi_app.exception_handlers
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            handler = handlers.get(cls)
            if handler is not None:
                return handler  # type: ignore[return-value]
        return None
