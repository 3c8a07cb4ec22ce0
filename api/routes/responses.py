"""OpenAI Responses API: POST /v1/responses (the chat job, api/dialects/responses.py), retrieve, delete."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from api.deps import CurrentKey, RedisDep
from api.dialects.responses import ResponsesDialect, delete_response, load_response
from api.dialects.responses_in import ResponsesRequest
from api.pipeline import serve

router = APIRouter()


@router.post("/v1/responses", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": ResponsesRequest.model_json_schema(by_alias=True)}}}})
async def create_response(request: Request) -> Response:
    """Create a model response (OpenAI Responses API; `model` optional, `stream` for SSE events)."""
    state = request.app.state
    return await serve(request, ResponsesDialect(state.settings, state.redis, state.background))


def create_route() -> APIRoute:
    """The route of POST /v1/responses (served by api/fastpath.DirectRoute)."""
    return next(r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is create_response)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """One of the caller's stored responses."""
    stored = await load_response(redis, key.id, response_id)
    response: dict[str, Any] = stored["response"]
    return response


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """The input items (the whole conversation) that led to one of the caller's stored responses."""
    items = (await load_response(redis, key.id, response_id))["conversation"]
    return {"object": "list", "data": items, "has_more": False,
            "first_id": items[0].get("id") if items else None, "last_id": items[-1].get("id") if items else None}


@router.delete("/v1/responses/{response_id}")
async def delete(response_id: str, key: CurrentKey, redis: RedisDep) -> dict[str, Any]:
    """Delete one of the caller's stored responses."""
    await delete_response(redis, key.id, response_id)
    return {"id": response_id, "object": "response", "deleted": True}
