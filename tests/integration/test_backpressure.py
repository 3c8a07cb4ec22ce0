"""Protective limits with real processes: open streams per key (across replicas), in-flight per process."""

import threading

import httpx
import openai
import pytest

from tests.support.processes import FakeUpstream, StreamProbe, scrape, wait_for
from tests.support.processes import metric_total as total

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say hello."}]


def test_open_streams_per_key_are_limited_across_replicas(gateway_factory, upstream: FakeUpstream) -> None:
    gateway = gateway_factory(workers=1, apis=2, FREEFERENCE_MAX_STREAMS_PER_KEY="2")
    key, other = gateway.create_key("free"), gateway.create_key("free")
    upstream.set_default("general-best", {"token_interval_s": 0.2})
    probes = [StreamProbe(gateway.client(key, replica=i, timeout=30), max_tokens=15).start() for i in (0, 1)]
    wait_for(lambda: all(p.first_at for p in probes), 15, "two open streams")
    before = scrape(gateway)
    for replica in (0, 1):  # the third stream of the key is refused on either replica
        with pytest.raises(openai.RateLimitError) as info:
            gateway.client(key, replica=replica).chat.completions.create(
                model="auto", messages=MESSAGES, max_tokens=2, stream=True)
        assert info.value.response.headers["retry-after"] == "1"
        assert "concurrent streams" in info.value.message
    # Only streams count, and only this key's.
    upstream.set_default("general-best", None)
    assert gateway.client(key).chat.completions.create(model="auto", messages=MESSAGES, max_tokens=2).choices
    assert list(gateway.client(other).chat.completions.create(model="auto", messages=MESSAGES, max_tokens=2,
                                                              stream=True))
    after = scrape(gateway)
    refused = {"limit": "streams_per_key"}
    assert total(after, "freeference_rate_limit_rejections_total", **refused) - total(
        before, "freeference_rate_limit_rejections_total", **refused) == 1  # replica 0's refusal
    for probe in probes:
        probe.join(30)
        assert probe.error is None
    # Slots are released when a stream ends.
    assert list(gateway.client(key).chat.completions.create(model="auto", messages=MESSAGES, max_tokens=2,
                                                            stream=True))


def test_a_full_process_answers_503_at_once(gateway_factory, upstream: FakeUpstream) -> None:
    gateway = gateway_factory(workers=1, apis=2, FREEFERENCE_MAX_INFLIGHT_REQUESTS="2")
    key = gateway.create_key("free")
    upstream.set_default("general-best", {"delay_s": 3})
    results: list[int] = []

    def slow() -> None:
        response = httpx.post(gateway.url(0) + "/v1/chat/completions", timeout=30,
                              headers={"Authorization": f"Bearer {key}"}, json={"messages": MESSAGES})
        results.append(response.status_code)

    threads = [threading.Thread(target=slow, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_for(lambda: total(scrape(gateway), "freeference_inflight_jobs") == 2, 10, "two requests in flight")
    refused = httpx.post(gateway.url(0) + "/v1/chat/completions", timeout=5,
                         headers={"Authorization": f"Bearer {key}"}, json={"messages": MESSAGES})
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    assert refused.headers["x-request-id"]
    # The limit is per process: the other replica still takes work. Health and metrics are never refused.
    assert httpx.get(gateway.url(0) + "/readyz", timeout=5).status_code == 200
    upstream.set_default("general-best", None)
    other = httpx.post(gateway.url(1) + "/v1/chat/completions", timeout=15,
                       headers={"Authorization": f"Bearer {key}"}, json={"messages": MESSAGES})
    assert other.status_code == 200
    for thread in threads:
        thread.join(30)
    assert results == [200, 200]
    assert total(scrape(gateway), "freeference_rate_limit_rejections_total", limit="process_inflight") == 1
