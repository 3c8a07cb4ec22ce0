"""POST /v1/messages through real processes, with the official anthropic SDK as the client."""

from collections.abc import Callable, Iterator

import anthropic
import httpx
import pytest

from tests.support.processes import FakeUpstream, Gateway

pytestmark = pytest.mark.integration

WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CLAUDE = "claude-sonnet-4-5"  # what Claude Code sends: unknown to the catalog, so routed as auto


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: Callable[..., Gateway]) -> Iterator[Gateway]:
    yield module_gateway_factory(workers=1, apis=1)


@pytest.fixture
def key(gateway: Gateway, upstream: FakeUpstream) -> str:
    return gateway.create_key("free")


@pytest.fixture
def client(gateway: Gateway, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.base_url, api_key=key, max_retries=0)


def test_create_returns_a_message(client: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    message = client.messages.create(model=CLAUDE, max_tokens=5, system="Be brief.",
                                     messages=[{"role": "user", "content": "Say hello."}])
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.model == "general-best"  # the model that served
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "[general-best] simulated reply: 1 2"
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 5 and message.usage.input_tokens > 0
    sent = upstream.requests()[-1]["body"]
    assert sent["messages"][:2] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Say hello."}]
    assert sent["max_tokens"] == 5 and "claude" not in str(sent.get("model"))


def test_a_stream_is_the_documented_event_sequence(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=CLAUDE, max_tokens=4,
                                messages=[{"role": "user", "content": "Count for me."}]) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert events[1:3] == ["content_block_start", "content_block_delta"]
    assert events[-3:-1] == ["content_block_stop", "message_delta"]
    assert final.content[0].text == "[general-best] simulated reply: 1"
    assert final.usage.output_tokens == 4 and final.stop_reason == "end_turn"


def test_raw_stream_carries_pings_and_event_names(gateway: Gateway, key: str) -> None:
    with httpx.stream("POST", gateway.base_url + "/v1/messages", timeout=20,
                      headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                      json={"model": CLAUDE, "max_tokens": 3, "stream": True,
                            "messages": [{"role": "user", "content": "Hi"}]}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("event: ")]
    assert lines[:2] == ["event: message_start", "event: ping"]


def test_a_tool_use_round_trip(client: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = client.messages.create(model=CLAUDE, max_tokens=50, tools=[WEATHER], messages=[question])
    assert first.stop_reason == "tool_use"
    use = next(block for block in first.content if block.type == "tool_use")
    assert use.name == "get_weather" and "city" in use.input
    answer = client.messages.create(model=CLAUDE, max_tokens=20, tools=[WEATHER], messages=[
        question, {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 and sunny"}]}])
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text"
    sent = upstream.requests()[-1]["body"]["messages"]
    assert sent[1]["tool_calls"][0]["id"] == use.id
    assert sent[2] == {"role": "tool", "tool_call_id": use.id, "content": "18 and sunny"}


def test_a_bad_key_is_an_anthropic_401(gateway: Gateway) -> None:
    bogus = anthropic.Anthropic(base_url=gateway.base_url, api_key="ff-bogus-" + "E" * 40, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        bogus.messages.create(model=CLAUDE, max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert info.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                          "message": "Incorrect API key provided."}}


@pytest.mark.parametrize(("body", "fragment"), [
    ({"model": CLAUDE, "messages": [{"role": "user", "content": "Hi"}]}, "max_tokens"),
    ({"model": CLAUDE, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document"}]}]},
     "document"),
    ({"model": CLAUDE, "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ({"model": CLAUDE, "max_tokens": 5, "messages": []}, "messages"),
])
def test_bad_input_is_an_anthropic_400(gateway: Gateway, key: str, body: dict, fragment: str) -> None:
    response = httpx.post(gateway.base_url + "/v1/messages", json=body, headers={"x-api-key": key}, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert fragment in error["error"]["message"]


def test_nothing_available_is_a_529_overloaded_error(client: anthropic.Anthropic, upstream: FakeUpstream) -> None:
    for model in ("general-best", "general-backup", "coder", "reasoner"):
        upstream.script(model, {"status": 429, "retry_after": 120})
    with pytest.raises(anthropic.APIStatusError):
        client.messages.create(model=CLAUDE, max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(anthropic.APIStatusError) as info:  # every candidate is cooling now
        client.messages.create(model=CLAUDE, max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert info.value.status_code == 529 and info.value.body["error"]["type"] == "overloaded_error"


def test_count_tokens(client: anthropic.Anthropic) -> None:
    short = client.messages.count_tokens(model=CLAUDE, messages=[{"role": "user", "content": "Hi"}])
    long = client.messages.count_tokens(model=CLAUDE, messages=[{"role": "user", "content": "Hi " * 400}])
    assert 0 < short.input_tokens < long.input_tokens
