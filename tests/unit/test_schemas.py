"""Request parsing: every malformed body becomes a 400 OpenAI error naming the parameter."""

import pytest

from api.errors import OpenAIError
from api.jsondepth import nesting_exceeds
from api.schemas import GATEWAY_FIELDS, parse_chat_request

DEPTH = 64


def _error(raw: bytes) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        parse_chat_request(raw, DEPTH)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize(("raw", "param", "fragment"), [
    (b"\xff\xfe", None, "UTF-8"),
    (b"   ", None, "empty"),
    (b"{", None, "parse"),
    (b"42", None, "JSON object"),
    (b'{"model": "auto"}', "messages", "Field required"),
    (b'{"messages": []}', "messages", "at least one"),
    (b'{"messages": [{"role": "user", "content": []}]}', "messages[0].content", "empty"),
    (b'{"messages": [{"content": "x"}]}', "messages[0].role", "required"),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}', "top_p", "less than or equal"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "10"}', "max_tokens", "integer"),
    (b'{"messages": [{"role": "user", "content": "x"}], "models": ["a", ""]}', "models[1]", "at least 1"),
    (b'{"messages": [{"role": "user", "content": "x"}], "route": {"intent": "poetry"}}', "route.intent", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "route": {"bogus": 1}}', "route.bogus",
     "Unrecognized request argument"),
])
def test_rejections_name_the_parameter(raw: bytes, param: str | None, fragment: str | None) -> None:
    error = _error(raw)
    assert error.body.param == param
    assert error.body.type == "invalid_request_error"
    if fragment:
        assert fragment in error.body.message


def test_valid_body_is_returned_verbatim() -> None:
    raw = (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "temperature": 0.25,'
           b' "tools": [{"type": "function", "function": {"name": "f"}}], "models": ["code"], "route": {}}')
    request, data = parse_chat_request(raw, DEPTH)
    assert request.model is None
    assert data["temperature"] == 0.25
    assert data["tools"][0]["function"]["name"] == "f"
    assert set(data) >= GATEWAY_FIELDS  # stripped later, when the job is built


def test_message_extensions_are_allowed() -> None:
    request, _ = parse_chat_request(
        b'{"messages": [{"role": "assistant", "content": null, "refusal": null, "tool_calls": []},'
        b' {"role": "tool", "tool_call_id": "c1", "content": "ok"}]}', DEPTH)
    assert len(request.messages) == 2


def _nested(levels: int) -> bytes:
    """A chat body whose response_format nests objects and arrays so that the body is `levels` deep."""
    inner = levels - 1  # the body itself is level 1
    return (b'{"messages": [{"role": "user", "content": "x"}], "response_format": '
            + b'{"a": [' * (inner // 2) + b'{"a": 1}' * (inner % 2) + b'1' * (1 - inner % 2)
            + b']}' * (inner // 2) + b'}')


@pytest.mark.parametrize("levels", [DEPTH + 1, 300, 1000])
def test_json_nested_past_the_limit_is_a_400_naming_it(levels: int) -> None:
    error = _error(_nested(levels))
    assert error.body.code == "invalid_request_error"
    assert str(DEPTH) in error.body.message


def test_json_nested_to_the_limit_is_accepted() -> None:
    _, data = parse_chat_request(_nested(DEPTH), DEPTH)
    assert data["response_format"]["a"]


@pytest.mark.parametrize(("value", "depth"), [
    ({"a": 1}, 1), ({"a": {"b": [1]}}, 3), ([[[[]]], {"x": [{}]}], 4), ([{}, [[{"k": [None]}]]], 5),
])
def test_nesting_is_counted_from_the_value_itself(value: object, depth: int) -> None:
    assert not nesting_exceeds(value, depth)
    assert nesting_exceeds(value, depth - 1) is (depth > 1)


def test_vendor_fields_pass_through() -> None:
    # vLLM's chat_template_kwargs, OpenRouter's provider routing and reasoning switches: the
    # gateway does not know them, the provider that serves the request may.
    _, data = parse_chat_request(b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": '
                                 b'{"enable_thinking": false}, "provider": {"order": ["a"]}, '
                                 b'"include_reasoning": true}', DEPTH)
    assert data["chat_template_kwargs"] == {"enable_thinking": False}
    assert data["provider"] == {"order": ["a"]} and data["include_reasoning"] is True
