"""The Responses and Messages dialects' translations, on their own (the e2e tests use the real SDKs)."""

from typing import Any

import orjson
import pytest

from api.dialects.messages_in import parse_messages_request
from api.dialects.messages_in import to_chat as messages_to_chat
from api.dialects.messages_out import MessagesStream, message_object
from api.dialects.responses_in import input_items, parse_responses_request
from api.dialects.responses_in import to_chat as responses_to_chat
from api.dialects.responses_out import ResponsesStream, output_items
from api.errors import OpenAIError
from workers.protocol import DoneEvent, ErrorBody, RouteInfo


def _responses_chat(body: dict[str, Any]) -> dict[str, Any]:
    request, data = parse_responses_request(orjson.dumps(body), 64)
    return responses_to_chat(request, input_items(data))


def _messages_chat(body: dict[str, Any]) -> dict[str, Any]:
    raw = orjson.dumps({"model": "claude-x", "max_tokens": 9, **body})
    return messages_to_chat(*parse_messages_request(raw, 64, need_max_tokens=True))


def test_responses_items_become_chat_messages() -> None:
    chat = _responses_chat({"input": [
        {"role": "developer", "content": "Rules."},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Look: "},
            {"type": "input_image", "image_url": "data:image/png;base64,AAA", "detail": "low"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "c1", "name": "a", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "b", "arguments": "{\"x\":1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Done."}]},
    ]})
    assert chat["messages"] == [
        {"role": "system", "content": "Rules."},
        {"role": "user", "content": [{"type": "text", "text": "Look: "},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA",
                                                                         "detail": "low"}}]},
        {"role": "assistant", "content": None, "tool_calls": [  # parallel calls: one assistant turn
            {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{\"x\":1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "assistant", "content": "Done."},
    ]


def test_responses_options_map_to_chat_fields() -> None:
    chat = _responses_chat({"input": "hi", "model": "code", "max_output_tokens": 7, "tool_choice": {
        "type": "function", "name": "f"}, "reasoning": {"effort": "low"}, "text": {"format": {"type": "json_object"}},
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}], "parallel_tool_calls": False})
    assert chat["model"] == "code" and chat["max_tokens"] == 7 and chat["reasoning_effort"] == "low"
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["response_format"] == {"type": "json_object"} and chat["parallel_tool_calls"] is False
    assert chat["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_a_chat_message_becomes_output_items() -> None:
    items = output_items({"role": "assistant", "content": "Hi", "reasoning_content": "think",
                          "tool_calls": [{"id": "call_1", "function": {"name": "f", "arguments": "{}"}}]})
    assert [item["type"] for item in items] == ["reasoning", "message", "function_call"]
    assert items[1]["content"][0]["text"] == "Hi" and items[2]["call_id"] == "call_1"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return orjson.dumps({"model": "m", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def _events(raw: bytes, marker: bytes = b"event: ") -> list[str]:
    return [line[len(marker):].decode() for line in raw.split(b"\n") if line.startswith(marker)]


def test_responses_stream_opens_and_closes_each_item_in_order() -> None:
    finished: list[dict[str, Any]] = []

    def render(status: str, output: list[Any], usage: Any, model: Any, reason: Any) -> dict[str, Any]:
        return {"status": status, "output": list(output), "model": model}

    stream = ResponsesStream(render, finished.append)
    raw = stream.start() + stream.chunk(_chunk({"reasoning_content": "hmm"})) + stream.chunk(_chunk({"content": "A"}))
    raw += stream.chunk(_chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{"}}]}))
    raw += stream.chunk(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}, "tool_calls"))
    raw += stream.done(DoneEvent(route=RouteInfo(model="m", provider="p", attempts=1)))
    assert _events(raw) == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert [item["type"] for item in finished[0]["output"]] == ["reasoning", "message", "function_call"]
    assert finished[0]["output"][2]["arguments"] == "{}"


def test_messages_turns_become_chat_messages() -> None:
    chat = _messages_chat({"system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Q"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                                                  "data": "BBB"}}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"},
                                          {"type": "text", "text": "Let me check."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True,
                                      "content": [{"type": "text", "text": "boom"}]},
                                     {"type": "text", "text": "Try again."}]},
    ], "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "tools": [{"name": "f", "input_schema": {"type": "object"}}], "stop_sequences": ["END"], "top_k": 5,
        "metadata": {"user_id": "u1"}})
    assert chat["messages"] == [
        {"role": "system", "content": "A\n\nB"},
        {"role": "user", "content": [{"type": "text", "text": "Q"},
                                     {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,BBB"}}]},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Error: boom"},  # results come first
        {"role": "user", "content": [{"type": "text", "text": "Try again."}]},
    ]
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False
    assert (chat["stop"], chat["top_k"], chat["user"], chat["max_tokens"]) == (["END"], 5, "u1", 9)


@pytest.mark.parametrize(("finish", "calls", "stop_reason"), [
    ("stop", False, "end_turn"), ("length", False, "max_tokens"), ("tool_calls", True, "tool_use"),
    ("stop", True, "tool_use"), ("content_filter", False, "refusal"),
])
def test_stop_reasons(finish: str, calls: bool, stop_reason: str) -> None:
    message: dict[str, Any] = {"role": "assistant", "content": "x"}
    if calls:
        message["tool_calls"] = [{"id": "c", "function": {"name": "f", "arguments": "not json"}}]
    rendered = message_object("msg_1", "m", {"choices": [{"message": message, "finish_reason": finish}]})
    assert rendered["stop_reason"] == stop_reason
    if calls:
        assert rendered["content"][1] == {"type": "tool_use", "id": "c", "name": "f", "input": {}}


def test_messages_stream_blocks_and_in_band_error() -> None:
    stream = MessagesStream("msg_1", "claude-x")
    raw = stream.start() + stream.chunk(_chunk({"content": "Hi"}))
    raw += stream.chunk(_chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": "{}"}}]}))
    raw += stream.error(ErrorBody(message="upstream failed", type="upstream_error"), 502)
    assert _events(raw) == ["message_start", "ping", "content_block_start", "content_block_delta",
                            "content_block_stop", "content_block_start", "content_block_delta", "error"]
    assert b'"message":{"id":"msg_1"' in raw and b'"model":"m"' in raw  # the served model, from the chunk
    assert b'"type":"api_error"' in raw and b"message_stop" not in raw


def test_unsupported_things_are_named() -> None:
    with pytest.raises(OpenAIError) as info:
        _responses_chat({"input": [{"type": "item_reference", "id": "x"}]})
    assert info.value.body.param == "input[0]" and "item_reference" in info.value.body.message
    with pytest.raises(OpenAIError) as info:
        _messages_chat({"messages": [{"role": "user", "content": [{"type": "search_result"}]}]})
    assert "search_result" in info.value.body.message
