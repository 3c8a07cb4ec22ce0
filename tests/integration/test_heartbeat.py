"""The worker's heartbeat thread against a real Redis: alive while the loop is late, gone when it is stuck."""

import time

import pytest
import redis

from workers import heartbeat
from workers.heartbeat import HeartbeatThread


def test_the_key_outlives_a_late_loop_and_lapses_for_a_stuck_one(redis_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    client = redis.Redis.from_url(redis_url)
    key, workers_key = "ff:test:heartbeat:w1", "ff:test:heartbeat:workers"
    client.delete(key, workers_key)
    beats = HeartbeatThread(redis_url, key, workers_key, "w1", every_s=0.1, ttl_s=0.4, info=lambda: b'{"running": 3}')
    beats.start()
    try:
        # Nothing calls loop_alive() for several TTLs (as when the event loop is busy): the
        # thread keeps the key, since the loop is late, not stuck.
        time.sleep(1.5)
        assert client.get(key) == b'{"running": 3}'
        assert client.zscore(workers_key, "w1") is not None
        # A loop that has not run for longer than the stuck limit: no more renewals, the key lapses.
        monkeypatch.setattr(heartbeat, "_LOOP_STUCK_MAX_S", 1.0)
        deadline = time.monotonic() + 5
        while client.exists(key) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not client.exists(key)
        beats.loop_alive()
        assert beats.beat() and client.exists(key)
    finally:
        beats.stop()
    # Stopped: nothing writes the key again once it is deleted (close() deletes it next).
    client.delete(key)
    time.sleep(0.3)
    assert not client.exists(key)
    client.delete(workers_key)
