"""The usage estimate for answers whose provider sent none."""

from router.attempt import _delta_chars
from workers.usage_estimate import completion_chars, estimated_usage, prompt_tokens


def test_estimate_is_marked_and_adds_up() -> None:
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x" * 400}]}
    usage = estimated_usage(body, completion_chars=80)
    assert usage["estimated"] is True
    assert usage["completion_tokens"] == 20
    assert usage["prompt_tokens"] == prompt_tokens(body) > 100
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_completion_chars_count_text_reasoning_and_tool_arguments() -> None:
    completion = {"choices": [
        {"message": {"role": "assistant", "content": "hello", "reasoning_content": "hm"}},
        {"message": {"role": "assistant", "content": None,
                     "tool_calls": [{"function": {"name": "f", "arguments": '{"a": 1}'}}]}}]}
    assert completion_chars(completion) == 5 + 2 + 1 + 8


def test_stream_deltas_count_the_same_things() -> None:
    assert _delta_chars({"role": "assistant", "content": "hello"}) == 5
    assert _delta_chars({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]}) == 3
    assert _delta_chars({"reasoning": "abc", "content": None}) == 3
