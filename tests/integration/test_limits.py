"""Per-key limits across two API replicas (different ports) sharing one Valkey, end to end."""

import asyncio
import math
import time
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from api.keys import key_id_of
from api.ratelimit import window_reset_s
from tests.conftest import GatewayFactory
from tests.support.processes import FakeUpstream, Gateway

pytestmark = pytest.mark.integration

MASTER = {"Authorization": "Bearer test-master-key-0123456789"}
MESSAGES = [{"role": "user", "content": "Say hello to the gateway."}]
LIMIT_HEADERS = [f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset")
                 for kind in ("requests", "tokens")]


@pytest.fixture(scope="module")
def gateway(module_gateway_factory: GatewayFactory) -> Iterator[Gateway]:
    yield module_gateway_factory(workers=2, apis=2)


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _burst(gateway: Gateway, key: str, n: int, path: str = "/v1/chat/completions") -> list[httpx.Response]:
    """n requests at once, alternating between the two replicas."""
    async with httpx.AsyncClient(timeout=30) as client:
        async def one(i: int) -> httpx.Response:
            url = gateway.url(i % 2) + path
            if path.endswith("/completions"):
                return await client.post(url, headers=_auth(key), json={"messages": MESSAGES, "max_tokens": 2})
            return await client.get(url, headers=_auth(key))

        return await asyncio.gather(*(one(i) for i in range(n)))


def _same_window(window_s: int, needed_s: float) -> None:
    """Wait for the next window if fewer than needed_s seconds are left in this one."""
    left = window_reset_s(window_s, time.time())
    if left < needed_s:
        time.sleep(left + 0.05)


def test_burst_admits_exactly_the_limit_across_replicas(gateway: Gateway, upstream: FakeUpstream) -> None:
    # A per-day limit: its window cannot end in the middle of the burst.
    key = gateway.create_key("free", rpd=8)
    responses = asyncio.run(_burst(gateway, key, 30))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 8 + [429] * 22
    assert len(upstream.requests()) == 8
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert int(refused.headers["retry-after"]) >= 1
        assert int(refused.headers["retry-after-ms"]) > 0
        assert refused.headers["x-ratelimit-limit-requests"] == "8"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert all(name in refused.headers for name in LIMIT_HEADERS)


def test_limit_headers_on_success_stream_and_errors(gateway: Gateway, upstream: FakeUpstream) -> None:
    _same_window(60, 15)
    key = gateway.create_key("pro", rpm=50, tpm=100_000)
    client = gateway.client(key, replica=1)
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES, max_tokens=3)
    assert raw.headers["x-ratelimit-limit-requests"] == "50"
    assert raw.headers["x-ratelimit-remaining-requests"] == "49"
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")

    with httpx.stream("POST", gateway.url(0) + "/v1/chat/completions", headers=_auth(key), timeout=10,
                      json={"messages": MESSAGES, "max_tokens": 3, "stream": True}) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["x-ratelimit-remaining-requests"] == "48"
        assert "data: [DONE]" in streamed.read().decode()

    invalid = httpx.post(gateway.url(1) + "/v1/chat/completions", headers=_auth(key), json={"messages": []})
    assert invalid.status_code == 400
    assert invalid.headers["x-ratelimit-remaining-requests"] == "47"

    upstream.script("general-best", *[{"status": 500}] * 4)
    failed = httpx.post(gateway.url(0) + "/v1/chat/completions", headers=_auth(key), timeout=20,
                        json={"model": "general-best", "messages": MESSAGES})
    assert failed.status_code == 502
    assert failed.headers["x-ratelimit-remaining-requests"] == "46"
    assert all(name in failed.headers for name in LIMIT_HEADERS)


def test_token_estimate_is_corrected_by_real_usage(gateway: Gateway, upstream: FakeUpstream) -> None:
    _same_window(60, 15)
    key = gateway.create_key("free", tpm=5_000)
    body = orjson.dumps({"messages": MESSAGES, "max_tokens": 4})
    estimate = math.ceil(len(body) / 4)
    first = httpx.post(gateway.url(0) + "/v1/chat/completions", headers={**_auth(key), "content-type":
                       "application/json"}, content=body, timeout=10)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-remaining-tokens"] == str(5_000 - estimate)
    used = first.json()["usage"]["total_tokens"]
    assert used != estimate  # otherwise this test proves nothing
    second = httpx.post(gateway.url(1) + "/v1/chat/completions", headers={**_auth(key), "content-type":
                        "application/json"}, content=body, timeout=10)
    # The first request now counts what it really used, the second its estimate.
    assert second.headers["x-ratelimit-remaining-tokens"] == str(5_000 - used - estimate)


def test_a_request_bigger_than_the_token_limit_is_refused(gateway: Gateway) -> None:
    key = gateway.create_key("free", tpm=100)
    big = [{"role": "user", "content": "word " * 400}]
    response = httpx.post(gateway.url(1) + "/v1/chat/completions", headers=_auth(key), json={"messages": big})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert "tokens per minute" in response.json()["error"]["message"]
    assert response.headers["x-ratelimit-limit-tokens"] == "100"


def test_revoked_key_fails_on_both_replicas_at_once(gateway: Gateway) -> None:
    key = gateway.create_key("free")
    for replica in (0, 1):
        ok = httpx.post(gateway.url(replica) + "/v1/chat/completions", headers=_auth(key),
                        json={"messages": MESSAGES, "max_tokens": 1}, timeout=10)
        assert ok.status_code == 200
    revoked = httpx.post(gateway.url(0) + f"/admin/keys/{key_id_of(key)}/revoke", headers=MASTER)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    for replica in (1, 0):
        refused = httpx.post(gateway.url(replica) + "/v1/chat/completions", headers=_auth(key),
                             json={"messages": MESSAGES, "max_tokens": 1}, timeout=10)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"


def test_limit_change_applies_on_the_next_request_everywhere(gateway: Gateway) -> None:
    key = gateway.create_key("free", rpd=1)
    assert asyncio.run(_burst(gateway, key, 1))[0].status_code == 200
    assert asyncio.run(_burst(gateway, key, 1))[0].status_code == 429
    patched = httpx.patch(gateway.url(1) + f"/admin/keys/{key_id_of(key)}", headers=MASTER,
                          json={"rpd": 3})
    assert patched.status_code == 200 and patched.json()["effective_limits"]["rpd"] == 3
    statuses = sorted(r.status_code for r in asyncio.run(_burst(gateway, key, 4)))
    assert statuses == [200, 200, 429, 429]


def test_random_model_is_limited_per_hour_across_replicas(gateway: Gateway) -> None:
    key = gateway.create_key("free")
    first_ten = asyncio.run(_burst(gateway, key, 10, path="/v1/models/random"))
    if first_ten[0].status_code == 404 and "random" not in first_ten[0].text:
        pytest.skip("GET /v1/models/random is not served by this build")
    assert all(r.status_code != 429 for r in first_ten), [r.status_code for r in first_ten]
    for replica in (1, 0):
        refused = httpx.get(gateway.url(replica) + "/v1/models/random", headers=_auth(key))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.headers["x-ratelimit-limit-requests"] == "10"
        assert 1 <= int(refused.headers["retry-after"]) <= 3600


def test_limits_reset_when_their_window_does(gateway_factory: GatewayFactory) -> None:
    short = gateway_factory(workers=1, apis=1, FREEFERENCE_RATE_WINDOW_S="2")
    key = short.create_key("free", rpm=2)
    _same_window(2, 1.5)
    responses = asyncio.run(_burst_one(short, key, 3))
    assert sorted(r.status_code for r in responses) == [200, 200, 429]
    refused = next(r for r in responses if r.status_code == 429)
    wait_ms = int(refused.headers["retry-after-ms"])
    assert 0 < wait_ms <= 2000
    time.sleep(wait_ms / 1000 + 0.05)
    again = asyncio.run(_burst_one(short, key, 2))
    assert [r.status_code for r in again] == [200, 200]

    # The stock SDK reads retry-after-ms, waits for the window to end and then succeeds.
    sdk_key = short.create_key("free", rpm=1)
    sdk = openai.OpenAI(base_url=short.url(0) + "/v1", api_key=sdk_key, max_retries=3, timeout=30)
    _same_window(2, 1.0)
    sdk.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=1)
    raw = sdk.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES, max_tokens=1)
    assert raw.status_code == 200 and raw.retries_taken >= 1
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"


async def _burst_one(gateway: Gateway, key: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return list(await asyncio.gather(*(
            client.post(gateway.url(0) + "/v1/chat/completions", headers=_auth(key),
                        json={"messages": MESSAGES, "max_tokens": 1}) for _ in range(n))))


def test_a_refused_pin_or_stream_leaves_nothing_queued(gateway: Gateway, upstream: FakeUpstream) -> None:
    # Admission and enqueue are one script (api/intake.py): a request it refuses must not run.
    free = gateway.create_key("free")
    pinned = httpx.post(gateway.url(0) + "/v1/chat/completions", headers=_auth(free), timeout=30,
                        json={"model": "general-best", "messages": MESSAGES, "max_tokens": 2})
    assert pinned.status_code == 403 and pinned.json()["error"]["code"] == "tier_not_allowed"
    assert "x-ratelimit-remaining-requests" in pinned.headers
    time.sleep(0.3)  # a job wrongly queued would have reached the fake by now
    assert upstream.requests() == []
