"""Capacity with real processes: a provider's own concurrency limit queues in the worker without
blaming the provider, and a pool with no room answers 503 + Retry-After instead of queueing."""

import httpx
import orjson
import pytest
from redis import Redis

from bench.fake_upstream import reply_tokens
from tests.support.processes import FakeUpstream, StreamProbe, catalog_yaml, wait_for
from workers.protocol import POOL_LOAD_KEY

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say hello."}]
TIMEOUTS = {"connect_s": 1, "first_token_s": 1, "idle_s": 2, "total_s": 20}


def _one_slot_catalog(url: str) -> str:
    """fake-a takes one request at a time; its wait is far longer than its first-token timeout."""
    return catalog_yaml(url, providers=[
        {"id": "fake-a", "base_url": url, "api_keys_env": ["FAKE_A_KEY"], "timeout": TIMEOUTS,
         "profile": {"limits": {"concurrent_requests": 1}}},
        {"id": "fake-b", "base_url": url, "requires_key": False, "timeout": TIMEOUTS},
    ])


def test_a_full_provider_queues_in_the_worker_and_is_never_blamed(gateway_factory, upstream: FakeUpstream) -> None:
    gateway = gateway_factory(workers=1, catalog=_one_slot_catalog(upstream.url))
    key = gateway.create_key("pro")
    upstream.set_default("general-best", {"token_interval_s": 0.25})  # 5 tokens: about 1.25 s each
    probes = [StreamProbe(gateway.client(key, timeout=30), max_tokens=5).start() for _ in range(4)]
    for probe in probes:
        probe.join(30)
    # Each waited for the one before it, up to ~4 s beyond a 1 s first-token timeout: every one
    # whole, all on the provider whose slot they waited for, none on the backup.
    assert [p.error for p in probes] == [None] * 4
    assert all(p.pieces == reply_tokens("general-best", 5) for p in probes)
    assert len(upstream.requests("general-best")) == 4
    assert upstream.requests("general-backup") == []
    # Its breaker never opened and nothing was recorded against it: the next request goes there first.
    upstream.set_default("general-best", None)
    answer = httpx.post(gateway.base_url + "/v1/chat/completions", timeout=15,
                        headers={"Authorization": f"Bearer {key}"}, json={"messages": MESSAGES, "max_tokens": 3})
    assert answer.status_code == 200
    assert (answer.headers["x-freeference-model"], answer.headers["x-freeference-attempts"]) == ("general-best", "1")


def _load_records(redis_url: str) -> list[dict[str, object]]:
    with Redis.from_url(redis_url) as redis:
        return [orjson.loads(raw) for raw in redis.hvals(POOL_LOAD_KEY)]


def test_a_pool_without_room_answers_503_with_retry_after(gateway_factory, upstream: FakeUpstream) -> None:
    # Two jobs is all this worker may run: its capacity is the safety ceiling here.
    gateway = gateway_factory(workers=1, FREEFERENCE_WORKER_MAX_JOBS="2")
    key = gateway.create_key("pro")
    upstream.set_default("general-best", {"token_interval_s": 0.3})
    probes = [StreamProbe(gateway.client(key, timeout=30), max_tokens=20).start() for _ in range(2)]
    wait_for(lambda: all(p.first_at for p in probes), 15, "two open streams")
    wait_for(lambda: any(r["running"] == 2 and r["room"] == 0 for r in _load_records(gateway.redis_url)), 10,
             "the worker's load record saying it is full")

    def refused() -> bool:
        response = httpx.post(gateway.base_url + "/v1/chat/completions", timeout=15,
                              headers={"Authorization": f"Bearer {key}"}, json={"messages": MESSAGES, "max_tokens": 2})
        if response.status_code != 503:
            return False
        assert response.json()["error"]["code"] == "overloaded"
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["x-freeference-limit"] == "worker_pool"
        return True

    # The API reads the pool's load a few times a second: the next read after the record refuses.
    wait_for(refused, 10, "a refusal while the pool is full")
    for probe in probes:
        probe.join(30)
        assert probe.error is None and probe.pieces == reply_tokens("general-best", 20)
    # Room again once the streams ended.
    upstream.set_default("general-best", None)

    def served() -> bool:
        return httpx.post(gateway.base_url + "/v1/chat/completions", timeout=15,
                          headers={"Authorization": f"Bearer {key}"},
                          json={"messages": MESSAGES, "max_tokens": 2}).status_code == 200

    wait_for(served, 10, "requests served again")
