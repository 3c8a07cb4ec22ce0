"""POST /v1/messages (Anthropic's Messages API) as a dialect of the chat job.

Claude Code and other Anthropic clients send their own model names (`claude-…`): the catalog's
model aliases route those the catalog does not know as `auto` (settings/catalog.py). The answer
names the model that served. Errors on these paths are in Anthropic's format (api/errors.py).
"""

from typing import Any

import orjson

from api.dialects.base import DialectStream
from api.dialects.messages_in import parse_messages_request, to_chat
from api.dialects.messages_out import MessagesStream, message_object, new_message_id
from api.schemas import ChatCompletionRequest, validate_chat_body
from workers.protocol import DoneEvent


class MessagesDialect:
    """One /v1/messages request."""

    def __init__(self, max_json_depth: int) -> None:
        self._max_json_depth = max_json_depth
        self._id = new_message_id()
        self._model = ""

    async def translate(self, raw: bytes, key_id: str) -> tuple[ChatCompletionRequest, dict[str, Any]]:
        request, data = parse_messages_request(raw, self._max_json_depth, need_max_tokens=True)
        chat = to_chat(request, data)
        self._model = request.model
        return validate_chat_body(chat), chat

    def completion(self, done: DoneEvent) -> bytes:
        return orjson.dumps(message_object(self._id, done.route.model, done.completion or {}))

    def stream(self) -> DialectStream:
        return MessagesStream(self._id, self._model)


def count_tokens(raw: bytes, max_json_depth: int) -> int:
    """The gateway's estimate of a Messages request's input tokens (about four bytes of JSON a token,
    as admission estimates them): providers count with their own tokenizers, which the gateway does not have."""
    chat = to_chat(*parse_messages_request(raw, max_json_depth, need_max_tokens=False))
    validate_chat_body(chat)
    counted = {k: chat[k] for k in ("messages", "tools") if k in chat}
    return max(1, len(orjson.dumps(counted)) // 4)
