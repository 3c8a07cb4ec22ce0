"""POST /v1/chat/completions: the gateway's own format, relayed byte for byte (api/pipeline.py)."""

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from api.dialects.base import ChatDialect
from api.pipeline import serve
from api.schemas import ChatCompletionRequest
from settings import Settings

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": ChatCompletionRequest.model_json_schema()}}}},
)
async def chat_completions(request: Request) -> Response:
    """Create a chat completion (OpenAI schema; `model` optional, `stream` for SSE)."""
    settings: Settings = request.app.state.settings
    return await serve(request, ChatDialect(settings.max_json_depth))


def completions_route() -> APIRoute:
    """The route of POST /v1/chat/completions (served by api/fastpath.DirectRoute)."""
    return next(r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is chat_completions)
