"""Chat completions → OpenAI Responses API answers: the `response` object and its event stream.

A chat message becomes output items: a `reasoning` item when the upstream model exposed its
reasoning (`reasoning_content` / `reasoning`), a `message` item for its text, one
`function_call` item per tool call. A stream becomes the documented event sequence, each event
numbered (`sequence_number`): `response.created`, `response.in_progress`, then per item
`response.output_item.added`, its deltas (`response.content_part.added`,
`response.output_text.delta` … / `response.function_call_arguments.delta` …), its `.done` events
and `response.output_item.done`, and finally `response.completed` (or `response.incomplete`
when the answer hit max_output_tokens). A failure after the first event is an `error` event
followed by `response.failed`, never `response.completed`.
"""

from collections.abc import Callable
from typing import Any

import orjson

from workers.protocol import (
    DoneEvent,
    ErrorBody,
    call_item,
    message_item,
    new_id,
    output_items,
    reasoning_item,
    reasoning_text,
    status_of,
    text_part,
    usage_of,
)

__all__ = ["ResponsesStream", "new_id", "output_items", "status_of", "usage_of"]

# Builds the whole response object: (status, output items, chat usage, served model, incomplete reason).
Render = Callable[[str, list[dict[str, Any]], dict[str, Any] | None, str | None, str | None], dict[str, Any]]


class ResponsesStream:
    """Chat chunks in, Responses events out (one instance per streamed answer)."""

    keepalive_s: float | None = None

    def keepalive(self) -> bytes:
        return b""

    def __init__(self, render: Render, on_finished: Callable[[dict[str, Any]], None]) -> None:
        self._render = render
        self._on_finished = on_finished  # the final response object, for storing it
        self._seq = 0
        self._output: list[dict[str, Any]] = []  # every item, in output order (open ones included)
        self._open_text: dict[str, Any] | None = None
        self._open_reasoning: dict[str, Any] | None = None
        self._calls: dict[int, dict[str, Any]] = {}  # tool-call index → its item, while the answer lasts
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._model: str | None = None

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    def start(self) -> bytes:
        skeleton = self._render("in_progress", [], None, None, None)
        return (self._event("response.created", response=skeleton)
                + self._event("response.in_progress", response=skeleton))

    def chunk(self, payload: bytes) -> bytes:
        data = orjson.loads(payload)
        self._model = self._model or data.get("model")
        if data.get("usage"):
            self._usage = data["usage"]
        out: list[bytes] = []
        for choice in data.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue  # n > 1 has no Responses form; the first choice is the answer
            delta = choice.get("delta") or {}
            reasoning = reasoning_text(delta)
            if reasoning:
                out.append(self._reasoning(reasoning))
            if isinstance(delta.get("content"), str) and delta["content"]:
                out.append(self._text(delta["content"]))
            for call in delta.get("tool_calls") or []:
                out.append(self._call(call))
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return b"".join(out)

    def done(self, done: DoneEvent) -> bytes:
        usage = done.usage or self._usage
        model = done.route.model or self._model
        closing = self._close_all()
        status, reason = status_of(self._finish)
        final = self._render(status, self._output, usage, model, reason)
        self._on_finished(final)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return closing + self._event(kind, response=final)

    def error(self, error: ErrorBody, status: int) -> bytes:
        failed = self._render("failed", self._output, self._usage, self._model, None)
        failed["error"] = {"code": error.code or "server_error", "message": error.message}
        return (self._event("error", code=error.code, message=error.message, param=error.param)
                + self._event("response.failed", response=failed))

    def _added(self, item: dict[str, Any]) -> bytes:
        self._output.append(item)
        return self._event("response.output_item.added", output_index=len(self._output) - 1, item=item)

    def _index(self, item: dict[str, Any]) -> int:
        return next(i for i, x in enumerate(self._output) if x is item)

    def _reasoning(self, text: str) -> bytes:
        out = b""
        if self._open_reasoning is None:
            out += self._close_text()
            self._open_reasoning = reasoning_item(new_id("rs"), "")
            out += self._added(self._open_reasoning)
        item = self._open_reasoning
        item["content"][0]["text"] += text
        return out + self._event("response.reasoning_text.delta", item_id=item["id"], output_index=self._index(item),
                                 content_index=0, delta=text)

    def _text(self, text: str) -> bytes:
        out = self._close_reasoning()
        if self._open_text is None:
            self._open_text = message_item(new_id("msg"), "in_progress", [])
            out += self._added(self._open_text)
            out += self._event("response.content_part.added", item_id=self._open_text["id"],
                               output_index=self._index(self._open_text), content_index=0, part=text_part(""))
            self._open_text["content"].append(text_part(""))
        item = self._open_text
        item["content"][0]["text"] += text
        return out + self._event("response.output_text.delta", item_id=item["id"], output_index=self._index(item),
                                 content_index=0, delta=text, logprobs=[])

    def _call(self, call: dict[str, Any]) -> bytes:
        out = self._close_reasoning() + self._close_text()
        index = int(call.get("index") or 0)
        function = call.get("function") or {}
        item = self._calls.get(index)
        if item is None:
            item = call_item(new_id("fc"), call.get("id") or new_id("call"), function.get("name") or "", "",
                             "in_progress")
            self._calls[index] = item
            out += self._added(item)  # serialized now: the event shows it empty, as it is
        elif function.get("name"):
            item["name"] += function["name"]
        arguments = function.get("arguments") or ""
        if arguments:
            item["arguments"] += arguments
            out += self._event("response.function_call_arguments.delta", item_id=item["id"],
                               output_index=self._index(item), delta=arguments)
        return out

    def _close_reasoning(self) -> bytes:
        item, self._open_reasoning = self._open_reasoning, None
        if item is None:
            return b""
        index = self._index(item)
        return (self._event("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=item["content"][0]["text"])
                + self._event("response.output_item.done", output_index=index, item=item))

    def _close_text(self) -> bytes:
        item, self._open_text = self._open_text, None
        if item is None:
            return b""
        index, part = self._index(item), item["content"][0]
        item["status"] = "completed"
        return (self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=part["text"], logprobs=[])
                + self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                              part=part)
                + self._event("response.output_item.done", output_index=index, item=item))

    def _close_all(self) -> bytes:
        out = self._close_reasoning() + self._close_text()
        for index in sorted(self._calls):
            item = self._calls[index]
            item["status"] = "completed"
            position = self._index(item)
            out += (self._event("response.function_call_arguments.done", item_id=item["id"], output_index=position,
                                arguments=item["arguments"], name=item["name"])
                    + self._event("response.output_item.done", output_index=position, item=item))
        self._calls.clear()
        return out
