"""POST /v1/responses through real processes, with the official openai SDK as the client."""

import io
import json
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from tests.support.processes import FakeUpstream, Gateway, wait_batch

pytestmark = pytest.mark.integration

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: Callable[..., Gateway]) -> Iterator[Gateway]:
    yield module_gateway_factory(workers=1, apis=1)


@pytest.fixture
def client(gateway: Gateway, upstream: FakeUpstream) -> openai.OpenAI:
    return gateway.client(gateway.create_key("free"))


def _last_upstream_body(upstream: FakeUpstream) -> dict:
    return upstream.requests()[-1]["body"]


def test_create_returns_a_response_object(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    response = client.responses.create(model="auto", input="Say hello.", instructions="Be brief.",
                                       max_output_tokens=6, metadata={"ticket": "42"})
    assert response.object == "response" and response.id.startswith("resp_") and response.status == "completed"
    assert response.model == "general-best"  # the model that served, not "auto"
    assert response.output_text == "[general-best] simulated reply: 1 2 3"
    assert response.usage.input_tokens > 0 and response.usage.output_tokens == 6
    assert response.metadata == {"ticket": "42"}
    sent = _last_upstream_body(upstream)
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["messages"][1] == {"role": "user", "content": "Say hello."} and sent["max_tokens"] == 6


def test_a_stream_is_the_documented_event_sequence(client: openai.OpenAI) -> None:
    with client.responses.stream(model="auto", input="Count for me.", max_output_tokens=5) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == "[general-best] simulated reply: 1 2"
    assert final.usage is not None and final.usage.output_tokens == 5


def test_a_function_call_round_trip_with_previous_response_id(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    first = client.responses.create(model="auto", input="What is the weather in Paris?", tools=[WEATHER])
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and "city" in calls[0].arguments
    assert upstream.requests()[-1]["body"]["tools"][0]["function"]["name"] == "get_weather"
    second = client.responses.create(model="auto", previous_response_id=first.id, tools=[WEATHER],
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": "18 degrees and sunny"}])
    assert second.output_text and second.previous_response_id == first.id
    sent = _last_upstream_body(upstream)["messages"]
    # The whole conversation went upstream: question, the call, its output.
    assert sent[0]["content"] == "What is the weather in Paris?"
    assert sent[1]["role"] == "assistant" and sent[1]["tool_calls"][0]["id"] == calls[0].call_id
    assert sent[2] == {"role": "tool", "tool_call_id": calls[0].call_id, "content": "18 degrees and sunny"}


def test_stored_responses_are_per_key(gateway: Gateway, client: openai.OpenAI) -> None:
    first = client.responses.create(model="auto", input="Remember me.")
    assert client.responses.retrieve(first.id).output_text == first.output_text
    items = client.responses.input_items.list(first.id)
    assert [item.role for item in items.data] == ["user"]
    stranger = gateway.client(gateway.create_key("free"))
    with pytest.raises(openai.NotFoundError):
        stranger.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        stranger.responses.create(model="auto", input="Go on.", previous_response_id=first.id)
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    unstored = client.responses.create(model="auto", input="Forget me.", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_text_format_becomes_response_format(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    client.responses.create(model="auto", input="Extract the name.",
                            text={"format": {"type": "json_schema", "name": "person", "schema": schema}})
    sent = _last_upstream_body(upstream)
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "auto"}, "input"),
    ({"input": [{"type": "computer_call", "id": "x"}]}, "input[0]"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
     "input[0].content[0]"),
])
def test_bad_input_is_an_openai_400_naming_it(gateway: Gateway, client: openai.OpenAI, body: dict,
                                              param: str) -> None:
    response = httpx.post(gateway.base_url + "/v1/responses", json=body, timeout=10,
                          headers={"Authorization": f"Bearer {client.api_key}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_a_failure_after_the_first_event_is_response_failed(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    for model in ("general-best", "general-backup", "coder", "reasoner"):
        upstream.script(model, {"cut_after": 3}, {"status": 500}, {"status": 500})
    with client.responses.stream(model="auto", input="Tell me a story.", max_output_tokens=12) as stream:
        kinds = [event.type for event in stream]
    assert "response.output_text.delta" in kinds
    assert kinds[-2:] == ["error", "response.failed"] and "response.completed" not in kinds


def test_limits_and_headers_apply_as_on_chat(gateway: Gateway, client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="auto", input="Hi.")
    assert raw.headers["x-freeference-model"] == "general-best"
    assert "x-ratelimit-remaining-requests" in raw.headers


def test_a_batch_of_responses_lines(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    def upload(lines: list[dict]) -> str:
        content = b"\n".join(json.dumps(line).encode() for line in lines)
        return client.files.create(file=("r.jsonl", io.BytesIO(content)), purpose="batch").id

    hello = {"custom_id": "hello", "method": "POST", "url": "/v1/responses",
             "body": {"model": "auto", "input": "Say hello.", "instructions": "Be brief.", "max_output_tokens": 6,
                      "metadata": {"ticket": "42"}}}
    weather = {"custom_id": "weather", "method": "POST", "url": "/v1/responses",
               "body": {"input": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [WEATHER]}}
    follow_up = {"custom_id": "follow-up", "method": "POST", "url": "/v1/responses",
                 "body": {"input": "And tomorrow?", "previous_response_id": "resp_0123"}}
    refused = client.batches.create(input_file_id=upload([hello, follow_up]), endpoint="/v1/responses",
                                    completion_window="24h")
    refused = wait_batch(client, refused.id, {"failed"}, timeout_s=10)
    assert refused.errors is not None and refused.errors.data[0].param == "body.previous_response_id"
    batch = client.batches.create(input_file_id=upload([hello, weather]), endpoint="/v1/responses",
                                  completion_window="24h")
    done = wait_batch(client, batch.id, {"completed", "failed"}, timeout_s=30)
    assert done.status == "completed" and done.output_file_id is not None
    results = {r["custom_id"]: r["response"]["body"]
               for r in map(json.loads, client.files.content(done.output_file_id).text.splitlines())}
    said = results["hello"]
    assert said["object"] == "response" and said["id"].startswith("resp_") and said["status"] == "completed"
    assert said["model"] == "general-best" and said["metadata"] == {"ticket": "42"} and said["store"] is False
    assert said["instructions"] == "Be brief." and said["usage"]["output_tokens"] == 6
    assert said["output"][0]["content"][0]["text"] == "[general-best] simulated reply: 1 2 3"
    call = results["weather"]["output"][0]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and json.loads(call["arguments"])
    with pytest.raises(openai.NotFoundError):  # a batch line's response is in the file, not stored
        client.responses.retrieve(said["id"])
