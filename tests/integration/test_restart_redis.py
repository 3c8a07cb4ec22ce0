"""A Redis restart: API and workers reconnect by themselves and serve again, no manual restart."""

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from bench.fake_upstream import reply_tokens
from tests.support.processes import (
    FakeUpstream,
    Gateway,
    OwnRedis,
    StreamProbe,
    base_env,
    catalog_yaml,
    wait_for,
)

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis-data")
    yield server
    if server.process.poll() is None:
        server.stop()


def _ready(gateway: Gateway) -> bool:
    try:
        return httpx.get(gateway.base_url + "/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _gateway_on(redis: OwnRedis, upstream: FakeUpstream, tmp_path: Path) -> Gateway:
    """A gateway (no processes yet) on this test's own server."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(catalog_yaml(upstream.url))
    return Gateway(redis_url=redis.url, env=base_env(redis.url, catalog), log_dir=tmp_path)


def test_api_and_workers_reconnect_after_redis_restart(own_redis: OwnRedis, upstream: FakeUpstream,
                                                       tmp_path: Path) -> None:
    gateway = _gateway_on(own_redis, upstream, tmp_path)
    try:
        gateway.start_worker()
        gateway.start_worker()
        gateway.start_api()
        gateway.wait_ready(2)
        key = gateway.create_key("free")
        client = gateway.client(key, timeout=15)
        assert client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=3).choices

        upstream.set_default("general-best", {"token_interval_s": 0.2})
        in_flight = StreamProbe(client, max_tokens=40).start()
        wait_for(lambda: in_flight.first_at is not None, 10, "first token of the in-flight stream")
        own_redis.stop()
        stopped_at = time.monotonic()
        wait_for(lambda: not _ready(gateway), 10, "/readyz to notice Redis is gone")
        # The in-flight stream's events are gone with the server: it ends with a clear error, fast.
        in_flight.join(10)
        assert in_flight.ended_at is not None and in_flight.ended_at - stopped_at < 8
        assert isinstance(in_flight.error, openai.APIError), in_flight.error
        assert in_flight.pieces == reply_tokens("general-best", 40)[: len(in_flight.pieces)]
        upstream.set_default("general-best", None)
        with pytest.raises(openai.APIStatusError) as info:  # a clear error while it is down, not a hang
            client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=3)
        assert info.value.status_code in (502, 503)
        time.sleep(1)
        own_redis.start()

        wait_for(lambda: _ready(gateway), 20, "/readyz after the restart")
        assert all(p.poll() is None for p in [*gateway.apis, *gateway.workers])  # nobody was restarted
        reply = client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=5)
        assert reply.choices[0].message.content == "".join(reply_tokens("general-best", 5))
        pieces = [c.choices[0].delta.content or "" for c in
                  client.chat.completions.create(model="auto", messages=MESSAGES, max_tokens=5, stream=True)
                  if c.choices]
        assert "".join(pieces) == "".join(reply_tokens("general-best", 5))
        # Both workers are back (heartbeats), so the pool is whole again.
        gateway.wait_ready(2, timeout_s=10)
    finally:
        gateway.stop()


def test_a_worker_and_an_api_stopped_while_redis_is_down_exit_cleanly(own_redis: OwnRedis, upstream: FakeUpstream,
                                                                       tmp_path: Path) -> None:
    # Their last clean-up writes (heartbeat, arq's health key) cannot land; the worker and the API
    # must still close their clients and exit 0, with a warning rather than a traceback.
    gateway = _gateway_on(own_redis, upstream, tmp_path)
    try:
        worker = gateway.start_worker()
        gateway.start_api()
        gateway.wait_ready(1)
        own_redis.stop()
        time.sleep(0.5)
        for process in (worker, *gateway.apis):
            process.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        # uvicorn re-raises the signal it caught once it has shut down.
        assert all(api.wait(timeout=30) in (0, -signal.SIGTERM) for api in gateway.apis)
    finally:
        gateway.stop()
    log = gateway.logs()
    assert "Traceback" not in log, log[-3000:]
