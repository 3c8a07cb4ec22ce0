"""Routing that fits the request, end to end: openai SDK → API → Redis → 2 workers → fake upstream.

Capabilities filter candidates before anything is sent, what a deployment says it lacks is
shared by every worker, a stated context limit routes this request and the next ones, equivalent
models share the traffic, and x-freeference-route says what was passed over and why.
"""

from collections import Counter
from collections.abc import Callable, Iterator

import openai
import pytest
import yaml

from tests.integration.test_failover_support import FAST_ENV, ask, forget_health
from tests.support.processes import FakeUpstream, Gateway

pytestmark = pytest.mark.integration

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
NO_TOOL_ENDPOINT = "No endpoints found that support tool use. To learn more about provider routing, visit: " \
                   "https://openrouter.ai/docs/provider-routing"


def routing_catalog(upstream_url: str) -> str:
    """General: smart (tools, an OpenRouter dialect) > plain (no tools) > tooled > small > narrow > mid,
    scores 0.1 apart (outside the spreading band); code: eq-1, eq-2, eq-3, equally scored."""
    timeout = {"connect_s": 1, "first_token_s": 5, "idle_s": 5, "total_s": 20}
    root = upstream_url.removesuffix("/v1")
    providers = [
        {"id": "fake-or", "base_url": f"{root}/openrouter/v1", "requires_key": False, "timeout": timeout,
         "refresh_models_s": 0, "profile": {"errors": "openrouter"}},
        {"id": "fake-a", "base_url": upstream_url, "api_keys_env": ["FAKE_A_KEY"], "timeout": timeout,
         "refresh_models_s": 0},
        {"id": "fake-b", "base_url": upstream_url, "requires_key": False, "timeout": timeout, "refresh_models_s": 0},
    ]

    def model(model_id: str, provider: str, window: int, caps: list[str], scores: dict[str, float]) -> dict:
        return {"id": model_id, "provider": provider, "upstream_name": model_id, "context_window": window,
                "capabilities": caps, "scores": scores}

    models = [
        model("smart", "fake-or", 32768, ["chat", "tools"], {"general": 0.95, "code": 0.5}),
        model("plain", "fake-a", 32768, ["chat"], {"general": 0.85, "code": 0.5}),
        model("tooled", "fake-b", 32768, ["chat", "tools"], {"general": 0.75, "code": 0.5}),
        model("small", "fake-b", 4096, ["chat"], {"general": 0.65}),
        model("narrow", "fake-a", 32768, ["chat"], {"general": 0.55}),
        model("mid", "fake-b", 8192, ["chat"], {"general": 0.45}),
        *(model(f"eq-{i}", "fake-b", 32768, ["chat"], {"code": 0.8}) for i in (1, 2, 3)),
    ]
    capabilities = {"text-basic": {"name": "General Chat Model", "intent": "general"},
                    "code": {"name": "Code Model", "intent": "code"}}
    return yaml.safe_dump({"providers": providers, "models": models, "capabilities": capabilities}, sort_keys=False)


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: Callable[..., Gateway], fake_upstream: FakeUpstream) -> Gateway:
    env = {**FAST_ENV, "FREEFERENCE_SPREAD_SCORE_BAND": "0.05", "FREEFERENCE_HEDGE_ENABLED": "false"}
    return module_gateway_factory(workers=2, catalog=routing_catalog(fake_upstream.url), **env)


@pytest.fixture
def key(gateway: Gateway, upstream: FakeUpstream) -> Iterator[str]:
    forget_health(gateway)
    yield gateway.create_key("pro")


def route(answer_headers: dict[str, str]) -> dict[str, str]:
    """x-freeference-route as deployment → reason."""
    line = answer_headers.get("x-freeference-route", "")
    return dict(entry.split("=", 1) for entry in line.split(", ") if "=" in entry)


@pytest.mark.parametrize("stream", [False, True])
def test_a_tools_request_goes_to_a_model_with_tools_and_says_why(gateway: Gateway, upstream: FakeUpstream, key: str,
                                                                  stream: bool) -> None:
    upstream.script("smart", {"status": 404, "message": NO_TOOL_ENDPOINT})
    answer = ask(gateway, key, stream, model="text-basic", tools=TOOLS)
    assert answer.model == "tooled"
    assert len(upstream.requests("smart")) == 1 and upstream.requests("plain") == []  # plain: never sent tools
    assert route(answer.headers) == {"fake-or/smart": "failed:not_servable", "fake-a/plain": "capability:tools"}
    # What smart said is every worker's now: it is not asked for tools again, nor cooled for others.
    for _ in range(4):
        again = ask(gateway, key, stream, model="text-basic", tools=TOOLS)
        assert again.model == "tooled"
        assert route(again.headers)["fake-or/smart"] == "capability:tools"
    assert len(upstream.requests("smart")) == 1
    assert ask(gateway, key, stream, model="text-basic").model == "smart"


def test_a_request_nothing_can_serve_is_a_400_naming_the_capability(gateway: Gateway, upstream: FakeUpstream,
                                                                    key: str) -> None:
    image = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"},
                                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    client = gateway.client(key)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="auto", messages=image, max_tokens=5, stream=stream)
        assert info.value.code == "unsupported_capability" and info.value.param == "messages"
        assert "image input" in info.value.message
    assert upstream.requests() == []  # nothing was sent anywhere, no raw upstream 4xx


def test_a_stated_limit_sends_the_request_to_a_fallback_that_fits_and_is_remembered(
        gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    long_prompt = [{"role": "user", "content": "word " * 4000}]  # about 5,000 tokens
    upstream.script("narrow", {"context_length": 4096, "context_requested": 5120})
    # narrow's catalog window (32k) is larger than mid's (8k); narrow says 4,096 and counted 5,120.
    answer = ask(gateway, key, stream=False, model="narrow", messages=long_prompt, extra_body={"models": ["mid"]})
    assert answer.model == "mid"
    assert route(answer.headers) == {"fake-a/narrow": "failed:context_length"}
    # The next request that size goes to mid at once, on either worker: narrow is not asked again.
    for stream in (True, False):
        again = ask(gateway, key, stream, model="narrow", messages=long_prompt, extra_body={"models": ["mid"]})
        assert again.model == "mid" and route(again.headers) == {"fake-a/narrow": "window"}
    assert len(upstream.requests("narrow")) == 1
    # Short requests still go to narrow.
    assert ask(gateway, key, stream=False, model="narrow", extra_body={"models": ["mid"]}).model == "narrow"


def test_equivalent_models_share_the_traffic(gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    served: Counter[str] = Counter()
    for _ in range(30):
        # A slower deployment rightly loses its draws (see router.select.rank); on a loaded machine one
        # slow answer can put a model in a slower latency bucket, so each draw starts from equal health.
        forget_health(gateway)
        served[ask(gateway, key, stream=False, model="code").model] += 1
    assert set(served) == {"eq-1", "eq-2", "eq-3"}
    assert min(served.values()) >= 3  # not the first one taking everything
    assert not any(r["model"] in ("smart", "plain", "tooled") for r in upstream.requests())  # outside the band
