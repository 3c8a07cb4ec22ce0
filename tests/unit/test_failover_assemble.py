"""Assembling a chat.completion from streamed chunks (non-streaming requests stream upstream too)."""

from typing import Any

from router.assemble import CompletionAssembler


def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "up",
                            "choices": choices, "system_fingerprint": "fp"}
    if usage:
        body["usage"] = usage
    return body


async def test_text_of_several_choices_and_usage() -> None:
    a = CompletionAssembler()
    await a.add(chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}},
                       {"index": 1, "delta": {"role": "assistant", "content": ""}}]))
    await a.add(chunk([{"index": 1, "delta": {"content": "Bon"}}, {"index": 0, "delta": {"content": "Hel"}}]))
    await a.add(chunk([{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"},
                       {"index": 1, "delta": {"content": "jour"}, "finish_reason": "length"}]))
    await a.add(chunk([], usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}))
    result = a.result("served-model")
    assert result["object"] == "chat.completion" and result["model"] == "served-model"
    assert [c["message"]["content"] for c in result["choices"]] == ["Hello", "Bonjour"]
    assert [c["finish_reason"] for c in result["choices"]] == ["stop", "length"]
    assert result["usage"]["total_tokens"] == 7
    assert (result["id"], result["created"], result["system_fingerprint"]) == ("c1", 7, "fp")


async def test_tool_calls_merge_by_index() -> None:
    a = CompletionAssembler()
    await a.add(chunk([{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_", "arguments": ""}},
        {"index": 1, "id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]}}]))
    await a.add(chunk([{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"name": "weather", "arguments": '{"city":'}}]}}]))
    await a.add(chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]},
                        "finish_reason": "tool_calls"}]))
    message = a.result("m")["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
    ]


async def test_reset_forgets_a_failed_attempt() -> None:
    a = CompletionAssembler()
    await a.add(chunk([{"index": 0, "delta": {"content": "half an ans"}}]))
    a.reset()
    await a.add(chunk([{"index": 0, "delta": {"content": "whole"}, "finish_reason": "stop"}]))
    assert a.result("m")["choices"][0]["message"]["content"] == "whole"
