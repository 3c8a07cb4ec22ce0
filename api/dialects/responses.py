"""POST /v1/responses as a dialect of the chat job, and the store of finished responses.

A response is stored (unless the request says `store: false`) under its owner's key id with a
TTL (`responses_ttl_s`, 30 days by default, as OpenAI keeps them), together with the whole
conversation that led to it, so `previous_response_id` continues a conversation without the
caller resending it, and a key never reads another key's response (another key's id simply
does not exist for it: 404, like an id that never did). The store write goes beside the
answer, not before it.
"""

import logging
import time
from typing import Any

import orjson
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.background import BackgroundWrites
from api.dialects.base import DialectStream
from api.dialects.responses_in import ResponsesRequest, input_items, parse_responses_request, to_chat
from api.dialects.responses_out import ResponsesStream, new_id, output_items, status_of, usage_of
from api.errors import OpenAIError
from api.ids import RESPONSE_ID, well_formed
from api.schemas import ChatCompletionRequest, validate_chat_body
from settings import Settings
from settings.logfields import STORE_DOWN
from workers.protocol import DoneEvent, stored_response_key

log = logging.getLogger("freeference.responses")


def response_not_found(response_id: str) -> OpenAIError:
    """The one answer for a malformed, unknown, expired or foreign response id."""
    shown = f" '{response_id}'" if well_formed(RESPONSE_ID, response_id) else ""
    return OpenAIError(404, f"No response found with id{shown}.", code="response_not_found", param="response_id")


async def load_response(redis: Redis, owner: str, response_id: str) -> dict[str, Any]:
    """{"response": …, "conversation": […]} of one of `owner`'s stored responses; 404 otherwise."""
    if not well_formed(RESPONSE_ID, response_id):
        raise response_not_found(response_id)
    raw = await redis.get(stored_response_key(owner, response_id))
    if raw is None:
        raise response_not_found(response_id)
    stored: dict[str, Any] = orjson.loads(raw)
    return stored


async def delete_response(redis: Redis, owner: str, response_id: str) -> None:
    """Forget one of `owner`'s responses; 404 when there is none."""
    if not well_formed(RESPONSE_ID, response_id) or not await redis.delete(stored_response_key(owner, response_id)):
        raise response_not_found(response_id)


def response_object(request: ResponsesRequest, response_id: str, created_at: int, status: str,
                    output: list[dict[str, Any]], chat_usage: dict[str, Any] | None, model: str | None,
                    incomplete_reason: str | None) -> dict[str, Any]:
    """The `response` object of `request`, with what its answer says so far."""
    fmt = request.text.format if request.text else None
    text_format = fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}
    tool_choice = request.tool_choice
    choice = tool_choice.model_dump() if isinstance(tool_choice, BaseModel) else tool_choice or "auto"
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status, "error": None,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": request.instructions, "max_output_tokens": request.max_output_tokens,
        "model": model or request.model or "auto", "output": list(output),
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "previous_response_id": request.previous_response_id,
        "reasoning": {"effort": (request.reasoning or {}).get("effort"), "summary": None},
        "store": request.store, "temperature": request.temperature, "text": {"format": text_format},
        "tool_choice": choice, "tools": [t.model_dump(exclude_none=True) for t in request.tools or []],
        "top_p": request.top_p,
        "truncation": "disabled", "usage": usage_of(chat_usage), "user": request.user,
        "metadata": request.metadata or {},
    }


class ResponsesDialect:
    """One /v1/responses request."""

    def __init__(self, settings: Settings, redis: Redis, background: BackgroundWrites) -> None:
        self._settings = settings
        self._redis = redis
        self._background = background
        self._id = new_id("resp")
        self._created_at = int(time.time())
        self._request: ResponsesRequest | None = None
        self._conversation: list[dict[str, Any]] = []
        self._owner = ""

    async def translate(self, raw: bytes, key_id: str) -> tuple[ChatCompletionRequest, dict[str, Any]]:
        request, data = parse_responses_request(raw, self._settings.max_json_depth)
        conversation = input_items(data)
        if request.previous_response_id is not None:
            previous = await load_response(self._redis, key_id, request.previous_response_id)
            conversation = [*previous["conversation"], *previous["response"]["output"], *conversation]
        chat = to_chat(request, conversation)
        if request.previous_response_id is not None and len(orjson.dumps(chat)) > self._settings.max_body_bytes:
            raise OpenAIError(413, "The conversation has grown past the request size limit; start a new one.",
                              code="request_too_large", param="previous_response_id")
        body = validate_chat_body(chat)
        self._request, self._conversation, self._owner = request, conversation, key_id
        return body, chat

    def completion(self, done: DoneEvent) -> bytes:
        completion = done.completion or {}
        choice = (completion.get("choices") or [{}])[0]
        status, reason = status_of(choice.get("finish_reason"))
        response = self.render(status, output_items(choice.get("message") or {}), completion.get("usage"),
                               done.route.model, reason)
        self._finished(response)
        return orjson.dumps(response)

    def stream(self) -> DialectStream:
        return ResponsesStream(self.render, self._finished)

    def render(self, status: str, output: list[dict[str, Any]], chat_usage: dict[str, Any] | None,
               model: str | None, incomplete_reason: str | None) -> dict[str, Any]:
        """The `response` object as it stands."""
        assert self._request is not None  # translate() ran before any event
        return response_object(self._request, self._id, self._created_at, status, output, chat_usage, model,
                               incomplete_reason)

    def _finished(self, response: dict[str, Any]) -> None:
        if self._request is None or not self._request.store:
            return
        stored = orjson.dumps({"response": response, "conversation": self._conversation})
        self._background.spawn(self._store(stored))

    async def _store(self, stored: bytes) -> None:
        try:
            await self._redis.set(stored_response_key(self._owner, self._id), stored,
                                  ex=int(self._settings.responses_ttl_s))
        except (RedisError, OSError) as exc:
            log.warning("response %s not stored (%s)", self._id, type(exc).__name__, extra=STORE_DOWN)
