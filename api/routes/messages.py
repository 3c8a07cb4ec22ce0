"""Anthropic Messages API: POST /v1/messages (the chat job, api/dialects/messages.py) and count_tokens."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from api.deps import CurrentKey, SettingsDep
from api.dialects.messages import MessagesDialect, count_tokens
from api.dialects.messages_in import CountTokensRequest, MessagesRequest
from api.pipeline import serve

router = APIRouter()


@router.post("/v1/messages", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": MessagesRequest.model_json_schema()}}}})
async def create_message(request: Request) -> Response:
    """Create a message (Anthropic Messages API; `x-api-key` or a bearer key; `stream` for SSE events)."""
    return await serve(request, MessagesDialect(request.app.state.settings.max_json_depth))


def create_route() -> APIRoute:
    """The route of POST /v1/messages (served by api/fastpath.DirectRoute)."""
    return next(r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is create_message)


@router.post("/v1/messages/count_tokens", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": CountTokensRequest.model_json_schema()}}}})
async def count_message_tokens(request: Request, _: CurrentKey, settings: SettingsDep) -> dict[str, Any]:
    """The gateway's estimate of a message request's input tokens."""
    return {"input_tokens": count_tokens(await request.body(), settings.max_json_depth)}
