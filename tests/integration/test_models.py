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


def test_list_and_retrieve(gateway: Gateway, key: str) -> None:
    client = gateway.client(key)
    models = client.models.list()
    assert [m.id for m in models.data] == [*GENERAL, "code-refused", SLASHY]
    raw = httpx.get(gateway.base_url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    first = raw["data"][0]
    assert first == {"id": "general-best", "object": "model", "created": first["created"], "owned_by": "fake-a",
                     "context_window": 8192, "capabilities": ["chat"]}
    slashy = client.models.retrieve(SLASHY)  # '/' and ':' in the path
    assert (slashy.id, slashy.owned_by) == (SLASHY, "fake-b")
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"
    assert httpx.get(gateway.base_url + "/v1/models").status_code == 401


def test_random_model_shape_and_health(gateway: Gateway, upstream: FakeUpstream, key: str) -> None:
    master = {"Authorization": f"Bearer {MASTER}"}
    body = httpx.get(gateway.base_url + "/v1/models/random", headers=master).json()
    assert set(body) == {"modelId", "name", "capabilityMapping", "contextWindow", "providerId"}
    assert body["modelId"] in [*GENERAL, "code-refused", SLASHY]
    if body["modelId"] == "general-best":
        assert body["name"] == "Best General" and body["contextWindow"] == 8192 and body["providerId"] == "fake-a"
    # The primary cools down (429 with a long Retry-After): random never offers it meanwhile.
    upstream.script("general-best", {"status": 429, "retry_after": 120})
    assert ask(gateway, key, stream=False).model == "general-backup"
    offered = {httpx.get(gateway.base_url + "/v1/models/random", headers=master).json()["modelId"] for _ in range(30)}
    assert "general-best" not in offered
    assert len(offered) >= 2  # random, not fixed


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
        return [m.id for m in client.models.list().data]

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
