"""The core request path end to end: openai SDK → uvicorn API → Redis/arq → worker → fake upstream."""

import json
import time

import httpx
import openai
import pytest

from bench.fake_upstream import reply_tokens
from tests.support.processes import FakeUpstream, Gateway

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say hello to the gateway."}]


@pytest.fixture
def key(shared_gateway: Gateway) -> str:
    return shared_gateway.create_key("free")


def test_non_streaming_with_sdk(shared_gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    client = shared_gateway.client(key)
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES, max_tokens=6)
    completion = raw.parse()
    assert completion.choices[0].message.content == "".join(reply_tokens("general-best", 6))
    assert completion.model == "general-best"
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    assert raw.headers["x-freeference-model"] == "general-best"
    assert raw.headers["x-freeference-provider"] == "fake-a"
    assert raw.headers["x-freeference-attempts"] == "1"
    assert raw.headers["x-request-id"]
    seen = upstream.requests()
    assert len(seen) == 1
    assert seen[0]["authorization"] == "Bearer sk-fake-a-0123456789"


def test_streaming_with_sdk(shared_gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    client = shared_gateway.client(key)
    stream = client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=12, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == "".join(reply_tokens("general-best", 12))


def test_stream_usage_only_when_asked(shared_gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    client = shared_gateway.client(key)
    chunks = list(client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    plain = list(client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=3, stream=True))
    assert all(c.usage is None for c in plain)


def test_every_openai_field_reaches_upstream_unchanged(shared_gateway: Gateway, upstream: FakeUpstream,
                                                       key: str) -> None:
    fields = {
        "temperature": 0.3, "top_p": 0.9, "max_tokens": 5, "stop": ["\n\n", "END"], "n": 1, "seed": 42,
        "user": "user-1", "presence_penalty": 0.1, "frequency_penalty": 0.2, "logit_bias": {"50256": -100},
        "response_format": {"type": "json_object"}, "parallel_tool_calls": False, "metadata": {"k": "v"},
        "tools": [{"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}],
        "tool_choice": "none",
    }
    response = httpx.post(shared_gateway.base_url + "/v1/chat/completions",
                          headers={"Authorization": f"Bearer {key}"},
                          json={"messages": MESSAGES, **fields}, timeout=10)
    assert response.status_code == 200, response.text
    sent = upstream.requests()[0]["body"]
    for name, value in fields.items():
        assert sent[name] == value, name
    assert sent["messages"] == MESSAGES
    assert sent["model"] == "general-best"


def test_raw_http_caller_may_omit_model(shared_gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    response = httpx.post(shared_gateway.base_url + "/v1/chat/completions",
                          headers={"Authorization": f"Bearer {key}"}, json={"messages": MESSAGES}, timeout=10)
    assert response.status_code == 200
    assert response.json()["object"] == "chat.completion"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(shared_gateway: Gateway, upstream: FakeUpstream, key: str, stream: bool) -> None:
    client = shared_gateway.client(key)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                              "required": ["city"]}}}]
    messages: list = [{"role": "user", "content": "Weather in Paris?"}]
    if stream:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in client.chat.completions.create(model="auto", messages=messages, tools=tools, stream=True):
            for delta_call in chunk.choices[0].delta.tool_calls or []:
                call = calls.setdefault(delta_call.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta_call.id or call["id"]
                if delta_call.function:
                    call["name"] += delta_call.function.name or ""
                    call["arguments"] += delta_call.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls"
        call = calls[0]
    else:
        first = client.chat.completions.create(model="auto", messages=messages, tools=tools)
        assert first.choices[0].finish_reason == "tool_calls"
        tool_call = first.choices[0].message.tool_calls[0]
        call = {"id": tool_call.id, "name": tool_call.function.name, "arguments": tool_call.function.arguments}
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "x"}
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "18C and sunny"},
    ]
    final = client.chat.completions.create(model="auto", messages=messages, tools=tools)
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content
    assert upstream.requests()[-1]["body"]["messages"][-1]["content"] == "18C and sunny"


def test_client_disconnect_stops_upstream_call(shared_gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    upstream.script("general-best", {"token_interval_s": 0.1})
    body = {"messages": MESSAGES, "stream": True, "max_tokens": 200}
    with httpx.Client(timeout=10) as http, http.stream(
            "POST", shared_gateway.base_url + "/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = 0
        for line in lines:
            if line.startswith("data: "):
                received += 1
            if received == 3:
                break
    # The worker must notice and close its upstream stream well before 200 tokens (20 s).
    deadline = time.monotonic() + 5
    outcome = None
    while time.monotonic() < deadline:
        outcome = upstream.requests("general-best")[0].get("outcome")
        if outcome == "client_disconnected":
            break
        time.sleep(0.1)
    entry = upstream.requests("general-best")[0]
    assert outcome == "client_disconnected", entry.get("outcome")
    assert entry["chunks_sent"] < 60


def test_upstream_failure_is_502_with_details(shared_gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    for model in ("general-best", "general-backup", "coder", "reasoner"):
        upstream.set_default(model, {"status": 500, "message": "boom Bearer sk-secret-should-not-leak"})
    client = shared_gateway.client(key)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="auto", messages=MESSAGES)
    assert info.value.status_code == 502
    error = info.value.body
    assert isinstance(error, dict)
    assert error["code"] == "upstream_failed"
    assert "fake-a" in error["message"]
    assert "sk-secret" not in error["message"]


@pytest.mark.parametrize(("prompt", "intent", "model"), [
    ("Write a Python function that parses ISO 8601 dates and add unit tests.", "code", "coder"),
    ("A train leaves at 3pm going 80 km/h; another leaves at 4pm at 100 km/h. When does the second catch up?",
     "reasoning", "reasoner"),
    ("Write a short, warm birthday message for my grandmother.", "general", "general-best"),
])
def test_model_less_requests_route_by_intent(shared_gateway: Gateway, upstream: FakeUpstream, key: str, prompt: str,
                                             intent: str, model: str) -> None:
    raw = shared_gateway.client(key).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt}])
    assert raw.headers["x-freeference-intent"] == intent
    assert raw.headers["x-freeference-intent-reason"]
    assert raw.parse().model == model
    assert upstream.requests()[-1]["model"] == model


def test_route_hint_overrides_the_classifier(shared_gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    raw = shared_gateway.client(key).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "Write a haiku about autumn."}],
        extra_body={"route": {"intent": "code"}})
    assert raw.headers["x-freeference-intent"] == "code"
    assert raw.parse().model == "coder"
    assert "route" not in upstream.requests()[-1]["body"]


@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_before_first_token_cancels_the_job(shared_gateway: Gateway, upstream: FakeUpstream,
                                                           key: str, stream: bool) -> None:
    upstream.script("general-best", {"first_token_delay_s": 3})
    body = {"messages": MESSAGES, "stream": stream, "max_tokens": 5}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(shared_gateway.base_url + "/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(10, read=0.5))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seen = upstream.requests("general-best")
        if seen and seen[0].get("outcome") == "client_disconnected":
            break
        time.sleep(0.1)
    assert upstream.requests("general-best")[0].get("outcome") == "client_disconnected"
    # The gateway stays healthy and logged no unhandled error for the departure.
    assert httpx.get(shared_gateway.base_url + "/healthz", timeout=5).status_code == 200
    assert "unhandled error" not in shared_gateway.logs()


def test_cut_after_the_role_opener_fails_over_invisibly(shared_gateway: Gateway, upstream: FakeUpstream,
                                                        key: str) -> None:
    # The fake's first frame is {"role": "assistant", "content": ""}; the cut comes before any
    # token, so the caller must get one whole answer from the fallback, not an in-band error.
    upstream.script("general-best", {"cut_after": 1})
    raw = shared_gateway.client(key).chat.completions.with_raw_response.create(
        model="auto", messages=MESSAGES, max_tokens=6, stream=True)
    served = raw.headers["x-freeference-model"]
    pieces = [c.choices[0].delta.content or "" for c in raw.parse() if c.choices]
    assert served == "general-backup"
    assert "".join(pieces) == "".join(reply_tokens(served, 6))
    assert [r["model"] for r in upstream.requests()] == ["general-best", "general-backup"]


def test_an_idle_keep_alive_connection_outlives_the_clients_pool_expiry(shared_gateway: Gateway, key: str) -> None:
    # httpx and the openai SDK drop idle pooled connections after 5 s. A server that closes them
    # at the same moment races the client's next request on them (a read error the request never
    # survives), so the API must keep them longer and let the client close first.
    # One pool, one connection, kept by the client for a minute: the second call reuses the first's.
    transport = httpx.HTTPTransport(limits=httpx.Limits(max_connections=1, keepalive_expiry=60))
    with httpx.Client(transport=transport, base_url=shared_gateway.base_url, timeout=10) as client:
        body = {"model": "auto", "messages": MESSAGES, "max_tokens": 2}
        headers = {"Authorization": f"Bearer {key}"}
        assert client.post("/v1/chat/completions", json=body, headers=headers).status_code == 200
        time.sleep(6)  # past uvicorn's default keep-alive (5 s)
        response = client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200
        connections = transport._pool.connections
        assert len(connections) == 1 and connections[0].info().endswith("Request Count: 2")
