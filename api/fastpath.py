"""The completion routes without FastAPI's routing layers: the innermost middleware serves them directly.

`POST /v1/chat/completions` (and its dialects, `/v1/responses` and `/v1/messages`) is nearly
every request the gateway sees, and each endpoint takes its own request apart (no
dependencies, no FastAPI body parsing). Between our middlewares and
the endpoint FastAPI still ran its exception middleware, its exit-stack middleware, the match
of the path against every route, the route's request/response wrapper and its dependency
solving: a few hundred microseconds on this machine per request (docs/performance.md). This
middleware sits innermost and calls the endpoint itself; everything else goes through FastAPI
as before. The route stays registered, so the OpenAPI schema and every other caller of the
app see it unchanged, and errors leave through the same handlers the app installs.
"""

from collections.abc import Awaitable, Callable, Sequence

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send


class DirectRoute:
    """Pure ASGI: serves `routes` by calling their endpoints, rendering errors with the app's handlers."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI, routes: Sequence[APIRoute]) -> None:
        self.app = app
        self._fastapi_app = fastapi_app
        self._routes = {(route.path, method): route for route in routes for method in route.methods or ()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self._routes.get((scope["path"], scope["method"])) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # as FastAPI's router sets it (metrics label by its template)
        request = Request(scope, receive, send)
        endpoint: Callable[[Request], Awaitable[Response]] = route.endpoint
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = self._handler_for(exc)
            if handler is None:
                raise  # the server-error middleware answers 500 with the app's handler, as for any route
            response = await handler(request, exc)
        del request  # a streamed answer may take minutes: it need not keep the request's body that long
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
