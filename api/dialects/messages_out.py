"""Chat completions → Anthropic Messages API answers: the `message` object and its event stream.

A chat message becomes content blocks: `text`, then one `tool_use` block per tool call (its
arguments parsed as the block's `input`). `finish_reason` becomes `stop_reason`: stop →
end_turn, length → max_tokens, tool_calls → tool_use, content_filter → refusal. A stream is
`message_start`, `ping`, then per block `content_block_start`, its deltas (`text_delta` /
`input_json_delta`) and `content_block_stop`, then `message_delta` (stop reason and usage) and
`message_stop`; a `ping` goes out whenever the stream has been quiet for a while. A failure
after the first event is an `error` event and no `message_stop`.

Source of the shapes: https://docs.anthropic.com/en/api/messages and
https://docs.anthropic.com/en/docs/build-with-claude/streaming.
"""

import uuid
from typing import Any

import orjson

from api.errors import anthropic_error
from workers.protocol import DoneEvent, ErrorBody

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
# A stream quiet for this long gets a ping, as Anthropic's own streams do (idle proxies, clients' timers).
PING_EVERY_S = 10.0


def new_message_id() -> str:
    """An id in Anthropic's style."""
    return f"msg_{uuid.uuid4().hex}"


def _input_of(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as tool_use input (an object; {} when a model sent none or garbage)."""
    try:
        value = orjson.loads(arguments) if arguments else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


def usage_of(chat_usage: dict[str, Any] | None) -> dict[str, int]:
    """Chat usage in Anthropic's shape."""
    usage = chat_usage or {}
    return {"input_tokens": int(usage.get("prompt_tokens") or 0), "output_tokens": int(usage.get("completion_tokens")
                                                                                          or 0),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}


def stop_reason_of(finish_reason: str | None, had_tool_calls: bool) -> str:
    """Anthropic's stop_reason for a chat finish_reason."""
    if had_tool_calls and finish_reason in (None, "stop", "tool_calls"):
        return "tool_use"
    return STOP_REASONS.get(finish_reason or "stop", "end_turn")


def message_object(message_id: str, model: str, completion: dict[str, Any]) -> dict[str, Any]:
    """The whole `message` for a chat.completion."""
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if isinstance(message.get("content"), str) and message["content"]:
        content.append({"type": "text", "text": message["content"]})
    calls = message.get("tool_calls") or []
    for call in calls:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                        "name": function.get("name", ""), "input": _input_of(function.get("arguments", ""))})
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason_of(choice.get("finish_reason"), bool(calls)), "stop_sequence": None,
            "usage": usage_of(completion.get("usage"))}


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


class MessagesStream:
    """Chat chunks in, Anthropic events out (one instance per streamed answer)."""

    keepalive_s: float | None = PING_EVERY_S

    def __init__(self, message_id: str, requested_model: str) -> None:
        self._id = message_id
        self._model = requested_model
        self._started = False
        self._index = -1  # the current content block's index
        self._open: str | None = None  # "text" or the tool-call index of the open tool_use block
        self._calls: set[int] = set()
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    def start(self) -> bytes:
        return b""  # message_start waits for the first chunk, which names the model that serves

    def keepalive(self) -> bytes:
        return _event("ping", {}) if self._started else b""

    def _begin(self, model: str | None) -> bytes:
        if self._started:
            return b""
        self._started = True
        self._model = model or self._model
        message: dict[str, Any] = {"id": self._id, "type": "message", "role": "assistant", "content": [],
                                   "model": self._model, "stop_reason": None, "stop_sequence": None,
                                   "usage": usage_of(None)}
        return _event("message_start", {"message": message}) + _event("ping", {})

    def chunk(self, payload: bytes) -> bytes:
        data = orjson.loads(payload)
        out = [self._begin(data.get("model"))]
        if data.get("usage"):
            self._usage = data["usage"]
        for choice in data.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str) and delta["content"]:
                out.append(self._text(delta["content"]))
            for call in delta.get("tool_calls") or []:
                out.append(self._tool(call))
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return b"".join(out)

    def done(self, done: DoneEvent) -> bytes:
        usage = usage_of(done.usage or self._usage)
        out = self._begin(done.route.model) + self._close()
        delta = {"stop_reason": stop_reason_of(self._finish, bool(self._calls)), "stop_sequence": None}
        out += _event("message_delta", {"delta": delta, "usage": {"output_tokens": usage["output_tokens"],
                                                                  "input_tokens": usage["input_tokens"]}})
        return out + _event("message_stop", {})

    def error(self, error: ErrorBody, status: int) -> bytes:
        _, body = anthropic_error(status, error)
        return self._begin(None) + _event("error", {"error": body["error"]})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return _event("content_block_stop", {"index": self._index})

    def _text(self, text: str) -> bytes:
        out = b""
        if self._open != "text":
            out += self._close()
            self._index += 1
            self._open = "text"
            out += _event("content_block_start", {"index": self._index, "content_block": {"type": "text", "text": ""}})
        delta = {"type": "text_delta", "text": text}
        return out + _event("content_block_delta", {"index": self._index, "delta": delta})

    def _tool(self, call: dict[str, Any]) -> bytes:
        out = b""
        position = int(call.get("index") or 0)
        function = call.get("function") or {}
        if self._open != f"tool{position}":
            out += self._close()
            self._index += 1
            self._open = f"tool{position}"
            self._calls.add(position)
            block: dict[str, Any] = {"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                     "name": function.get("name") or "", "input": {}}
            out += _event("content_block_start", {"index": self._index, "content_block": block})
        arguments = function.get("arguments") or ""
        if arguments:
            out += _event("content_block_delta", {"index": self._index,
                                                  "delta": {"type": "input_json_delta", "partial_json": arguments}})
        return out
