"""GET /v1/models, /v1/models/{id} and /v1/models/random against live workers and shared health."""

import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
import yaml

from tests.integration.test_failover_support import FAST_ENV, ask, failover_catalog, forget_health
from tests.support.processes import FakeUpstream, Gateway

pytestmark = pytest.mark.integration

GENERAL = ["general-best", "general-backup", "general-small", "coder"]
SLASHY = "vendor/slashy-model:free"
MASTER = "test-master-key-0123456789"


def catalog(upstream_url: str) -> str:
    data = yaml.safe_load(failover_catalog(upstream_url, refresh_models_s=0.5))
    data["models"].append({"id": SLASHY, "provider": "fake-b", "upstream_name": "slashy", "context_window": 65536,
                           "capabilities": ["chat", "reasoning"], "scores": {"reasoning": 0.9},
                           "name": "Slashy Reasoner"})
    data["capabilities"]["reasoning"] = {"name": "Reasoning Model", "intent": "reasoning"}
    return yaml.safe_dump(data, sort_keys=False)


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: Callable[..., Gateway], fake_upstream: FakeUpstream) -> Gateway:
    return module_gateway_factory(workers=2, catalog=catalog(fake_upstream.url), **FAST_ENV)


@pytest.fixture
def key(gateway: Gateway, upstream: FakeUpstream) -> Iterator[str]:
    forget_health(gateway)
    yield gateway.create_key("free")


def wait_for(check: Callable[[], bool], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


CAPABILITIES = ["text-basic", "code", "reasoning", "auto"]


def test_list_and_retrieve(gateway: Gateway, key: str) -> None:
    client = gateway.client(key)
    # A free key sees the ids it may send: the capability ids, owned by the gateway.
    assert [m.id for m in client.models.list().data] == CAPABILITIES
    raw = httpx.get(gateway.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    text_basic = raw["data"][0]
    # Its window and capabilities are those of its routable candidates (the largest window).
    assert text_basic == {"id": "text-basic", "object": "model", "created": text_basic["created"],
                          "owned_by": "freeference", "context_window": 32768, "capabilities": ["chat", "code"]}
    assert raw["data"][2]["context_window"] == 65536  # reasoning: the slashy model only
    # A pro key may pin exact models, so it sees them too.
    pro = gateway.client(gateway.create_key("pro"))
    assert [m.id for m in pro.models.list().data] == [*CAPABILITIES, *GENERAL, "code-refused", SLASHY]
    listed = httpx.get(gateway.base_url + "/v1/models", headers={"Authorization": f"Bearer {pro.api_key}"}).json()
    first = next(m for m in listed["data"] if m["id"] == "general-best")
    assert first == {"id": "general-best", "object": "model", "created": first["created"], "owned_by": "fake-a",
                     "context_window": 8192, "capabilities": ["chat"]}
    slashy = client.models.retrieve(SLASHY)  # '/' and ':' in the path
    assert (slashy.id, slashy.owned_by) == (SLASHY, "fake-b")
    assert client.models.retrieve("code").owned_by == "freeference"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"
    assert httpx.get(gateway.base_url + "/v1/models").status_code == 401


@pytest.mark.parametrize("tier", ["free", "pro"])
def test_the_resilient_app_example_works_as_written(gateway: Gateway, key: str, tier: str) -> None:
    """The product's own example: take a random model, send its modelId as `model`."""
    # code-refused's provider refuses every connection: until the gateway has seen that (two code
    # requests, each failing over to coder after two refusals, open its breaker) it counts as
    # healthy, and a pro key would get it pinned one time in six.
    for _ in range(2):
        assert ask(gateway, key, stream=False, model="code").model == "coder"
    client = gateway.client(key if tier == "free" else gateway.create_key("pro"))
    model = httpx.get(gateway.base_url + "/v1/models/random",
                      headers={"Authorization": f"Bearer {client.api_key}"}).json()
    reply = client.chat.completions.create(model=model["modelId"], messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content
    assert set(model) == {"modelId", "name", "capabilityMapping", "contextWindow", "providerId"}
    assert isinstance(model["capabilityMapping"], str)
    if tier == "free":  # a capability id, named by its display name
        assert model["modelId"] == model["capabilityMapping"] in ("text-basic", "code", "reasoning")
        assert model["name"] in ("General Chat Model", "Code Model", "Reasoning Model")
    else:  # an exact model, which a pro key may pin
        assert model["modelId"] in [*GENERAL, SLASHY] and reply.model == model["modelId"]
        assert model["capabilityMapping"] in ("text-basic", "code", "reasoning")


def test_random_model_shape_and_health(gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    master = {"Authorization": f"Bearer {MASTER}"}
    body = httpx.get(gateway.base_url + "/v1/models/random", headers=master).json()
    assert set(body) == {"modelId", "name", "capabilityMapping", "contextWindow", "providerId"}
    assert body["modelId"] in [*GENERAL, "code-refused", SLASHY]
    if body["modelId"] == "general-best":
        assert body["name"] == "Best General" and body["contextWindow"] == 8192 and body["providerId"] == "fake-a"
        assert body["capabilityMapping"] == "text-basic"
    # Both keys of the primary's provider get a 429 with a long Retry-After: with no key left it
    # cools, and random never offers it meanwhile.
    upstream.script("general-best", {"status": 429, "retry_after": 120}, {"status": 429, "retry_after": 120})
    assert ask(gateway, key, stream=False).model == "general-backup"
    assert ask(gateway, key, stream=False).model == "general-backup"
    offered = {httpx.get(gateway.base_url + "/v1/models/random", headers=master).json()["modelId"] for _ in range(30)}
    assert "general-best" not in offered
    assert len(offered) >= 2  # random, not fixed
    # For a free key, text-basic is now served by its best healthy candidate.
    free = {"Authorization": f"Bearer {gateway.create_key('free')}"}
    for _ in range(10):
        body = httpx.get(gateway.base_url + "/v1/models/random", headers=free).json()
        if body["modelId"] == "text-basic":
            assert (body["contextWindow"], body["providerId"]) == (32768, "fake-b")


def test_random_is_503_when_nothing_is_healthy(gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    for model in ("general-best", "general-backup", "general-small", "coder", "slashy"):
        upstream.script(model, {"status": 429, "retry_after": 90})
    with pytest.raises(openai.APIStatusError):
        ask(gateway, key, stream=False)
    with pytest.raises(openai.APIStatusError):
        ask(gateway, gateway.create_key("pro"), stream=False, model=SLASHY)
    for _ in range(2):  # the refused route opens its breaker (3 failures)
        with pytest.raises(openai.APIStatusError):
            ask(gateway, key, stream=False, model="code")
    response = httpx.get(gateway.base_url + "/v1/models/random", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_models_available"
    assert 1 <= int(response.headers["retry-after"]) <= 90


def test_random_is_limited_to_ten_an_hour_per_key(gateway: Gateway, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    statuses = [httpx.get(gateway.base_url + "/v1/models/random", headers=headers).status_code for _ in range(10)]
    assert statuses == [200] * 10
    refused = httpx.get(gateway.base_url + "/v1/models/random", headers=headers)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 0 < int(refused.headers["retry-after"]) <= 3600
    other = gateway.create_key("free")  # per key: another key is unaffected
    assert httpx.get(gateway.base_url + "/v1/models/random",
                     headers={"Authorization": f"Bearer {other}"}).status_code == 200


def test_a_model_that_vanished_upstream_leaves_rotation_and_comes_back(gateway: Gateway, upstream: FakeUpstream,
                                                                       key: str) -> None:
    client = gateway.client(key)
    pro = gateway.create_key("pro")
    upstream.set_models(["general-best", "general-backup", "coder", "slashy"])  # general-small retired

    def listed() -> list[str]:
        return [m.id for m in gateway.client(pro).models.list().data]

    assert wait_for(lambda: "general-small" not in listed())
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("general-small")
    with pytest.raises(openai.APIStatusError) as info:
        ask(gateway, pro, stream=False, model="general-small")
    assert info.value.status_code == 503 and info.value.code == "no_models_available"
    assert upstream.requests("general-small") == []
    upstream.set_models(["general-best", "general-backup", "general-small", "coder", "slashy"])
    assert wait_for(lambda: "general-small" in listed())
    assert ask(gateway, pro, stream=True, model="general-small").model == "general-small"
