"""Capacity from measurement: the worker's meter, the API's reading of the pool, per-provider slots."""

import asyncio
import time

import orjson
import pytest
from arq.jobs import serialize_job
from fakeredis import FakeAsyncRedis

from api.pool_load import PoolLoad
from router.catalog import ProviderRuntime
from router.providers.slots import ProviderSlots
from settings import Settings
from settings.catalog import ProviderConfig
from workers.capacity import CapacityMeter
from workers.main import ready_entry_enqueued_ms, room_or_promised
from workers.protocol import WorkerLoad, ready_entry


def _meter(running: list[int], **settings: float) -> CapacityMeter:
    return CapacityMeter(Settings(**settings), lambda: running[0])


def test_capacity_follows_the_cpu_a_steady_job_costs() -> None:
    running = [0]
    meter = _meter(running, worker_cpu_max=0.8)
    meter.observe(cpu_s=0.0125, wall_s=0.25, rss_kb=50_000)  # idle: 5 % of a core is not the jobs'
    assert meter.room() == Settings().worker_start_capacity  # nothing measured yet
    running[0] = 100
    meter.note_started(100)
    meter.observe(cpu_s=0.1, wall_s=0.25, rss_kb=60_000)  # a burst's start-up: not a running cost
    assert meter.cpu_per_job is None
    meter.observe(cpu_s=0.0625, wall_s=0.25, rss_kb=60_000)  # steady: 25 % - 5 % idle for 100 jobs
    assert meter.cpu_per_job == pytest.approx(0.002)
    assert meter.capacity() == 375  # (0.8 - 0.05) / 0.002, above twice the 100 carried: measured now
    assert meter.room() == 275
    assert meter.record(ttl_s=1).room == 275


def test_a_fresh_worker_takes_its_start_capacity_then_twice_what_it_carried_on_time() -> None:
    running = [0]
    meter = _meter(running, worker_start_capacity=256, worker_loop_lag_max_ms=100)
    assert meter.capacity() == 256 and meter.record(ttl_s=1).room == 256  # not the 10,000 ceiling
    running[0] = 256
    meter.note_started(256)
    meter.observe(cpu_s=0.01, wall_s=0.25, rss_kb=0)  # ran them on time
    assert meter.capacity() == 512
    running[0] = 512
    meter.lag_s = 0.3  # too many: late
    meter.observe(cpu_s=0.01, wall_s=0.25, rss_kb=0)
    assert meter.carried == 256  # a late load proves nothing


def test_a_late_loop_stops_pickup_but_not_the_published_room() -> None:
    meter = _meter([10], worker_loop_lag_max_ms=100)
    meter.lag_s = 0.2
    assert meter.lagging and not meter.overwhelmed
    assert meter.room() == 0
    assert meter.free() > 0 and meter.record(ttl_s=1).room == meter.free()
    meter.lag_s = 0.5
    assert meter.overwhelmed  # a timeout now is this process's, not the provider's


def test_memory_bounds_the_room_when_set() -> None:
    running = [0]
    meter = _meter(running, worker_memory_max_mb=100, worker_start_capacity=5000)
    meter.observe(cpu_s=0.0, wall_s=0.25, rss_kb=40_000)
    running[0] = 100
    meter.observe(cpu_s=0.0, wall_s=0.25, rss_kb=45_000)  # 50 KB per job
    assert meter.kb_per_job == pytest.approx(50)
    assert meter.capacity() == (100 * 1024 - 40_000) // 50


def _record(room: int, finished_per_s: float = 0.0, expires_in_s: float = 1.0, running: int = 0,
            lagging: bool = False) -> bytes:
    return WorkerLoad(running=running, room=room, lagging=lagging, started_per_s=0, finished_per_s=finished_per_s,
                      lag_ms=0, cpu=0, rss_kb=0,
                      expires_unix_ms=int((time.time() + expires_in_s) * 1000)).model_dump_json().encode()


def test_the_api_admits_while_the_pool_has_room_and_refuses_at_once_after() -> None:
    pool = PoolLoad(None, "ff:queue", every_s=0.25, pickup_timeout_s=4)
    assert pool.refusal() is None  # nothing read yet: the pickup deadline decides, as before
    pool.observe({b"w1": _record(room=2), b"w2": _record(room=1)}, queued=1, now_unix_s=time.time())
    assert pool.refusal() is None and pool.refusal() is None  # room 3, one queued: two more
    refused = pool.refusal()
    assert refused is not None and refused.status == 503 and refused.body.code == "overloaded"
    assert refused.headers["Retry-After"] == "2"
    # Jobs that finish within half the pickup deadline count as room.
    pool.observe({b"w1": _record(room=0, finished_per_s=10)}, queued=5, now_unix_s=time.time())
    assert pool.refusal() is None


def test_api_replicas_share_the_room_between_reads() -> None:
    # Both replicas read room 10 at the same moment; each counts only its own admissions until the
    # next read, so each may take half, not all ten (twenty would wait out the pickup deadline).
    replicas = [PoolLoad(None, "ff:queue", every_s=0.25, pickup_timeout_s=4) for _ in range(2)]
    for pool in replicas:
        pool.observe({b"w1": _record(room=10)}, queued=0, now_unix_s=time.time(), replicas=2)
    admitted = [sum(pool.refusal() is None for _ in range(10)) for pool in replicas]
    assert admitted == [5, 5]
    # A replica alone (before its presence is read back, it still counts itself) takes the whole room.
    alone = PoolLoad(None, "ff:queue", every_s=0.25, pickup_timeout_s=4)
    alone.observe({b"w1": _record(room=10)}, queued=4, now_unix_s=time.time(), replicas=0)
    assert sum(alone.refusal() is None for _ in range(10)) == 6
    # The last slot is not refused by every replica: each may take one (an overshoot of one per replica).
    for pool in replicas:
        pool.observe({b"w1": _record(room=1)}, queued=0, now_unix_s=time.time(), replicas=2)
    assert [pool.refusal() is None for pool in replicas] == [True, True]


def test_stale_records_decide_nothing_and_long_dead_ones_are_dropped() -> None:
    pool = PoolLoad(None, "ff:queue", every_s=0.25, pickup_timeout_s=4)
    dead = pool.observe({b"gone": _record(room=0, expires_in_s=-120), b"old": _record(room=5, expires_in_s=-10),
                         b"junk": b"{"}, queued=9, now_unix_s=time.time())
    assert dead == [b"gone"]
    assert pool.refusal() is None


def test_a_record_that_lapsed_moments_ago_is_a_late_worker_with_no_room() -> None:
    pool = PoolLoad(None, "ff:queue", every_s=0.25, pickup_timeout_s=4)
    pool.observe({b"late": _record(room=50, expires_in_s=-1, running=9)}, queued=0, now_unix_s=time.time())
    refused = pool.refusal()  # busy and too late to publish: full now, not unknown
    assert refused is not None and refused.body.code == "overloaded"
    pool.observe({b"late": _record(room=50, expires_in_s=-1, running=9), b"w2": _record(room=1)}, queued=0,
                 now_unix_s=time.time())
    assert pool.refusal() is None and pool.refusal() is not None  # only the on-time worker's room
    # Idle when it went quiet (starting up on a crowded machine): its room still counts, and so
    # does an idle worker's whose loop is late.
    pool.observe({b"late": _record(room=50, expires_in_s=-1)}, queued=0, now_unix_s=time.time())
    assert pool.refusal() is None
    pool.observe({b"w1": _record(room=50, lagging=True)}, queued=0, now_unix_s=time.time())
    assert pool.refusal() is None


async def test_a_provider_limit_queues_attempts_in_the_worker() -> None:
    def provider(limit: int | None) -> ProviderRuntime:
        config = ProviderConfig.model_validate({"id": f"p{limit}", "base_url": "http://x",
                                                "profile": {"limits": {"concurrent_requests": limit}}})
        return ProviderRuntime(config=config, base_url="http://x", api_keys=())

    slots = ProviderSlots()
    limited, free = provider(2), provider(None)
    peak = {"limited": 0, "free": 0}
    now = {"limited": 0, "free": 0}

    async def attempt(which: str) -> None:
        async with slots.hold(limited if which == "limited" else free):
            now[which] += 1
            peak[which] = max(peak[which], now[which])
            await asyncio.sleep(0.01)
            now[which] -= 1

    await asyncio.gather(*(attempt(w) for w in ("limited", "free") for _ in range(6)))
    assert peak == {"limited": 2, "free": 6}


def test_load_records_are_small() -> None:
    assert len(_record(room=1234)) < 200
    assert orjson.loads(_record(room=1))["room"] == 1


def test_a_steady_load_that_keeps_the_loop_late_caps_the_capacity_below_it() -> None:
    running = [200]
    meter = _meter(running, worker_loop_lag_max_ms=100)
    meter.lag_s = 0.3  # a machine shared with other work: the CPU share looks low, the loop is late
    meter.observe(cpu_s=0.05, wall_s=0.25, rss_kb=0)
    assert meter.lag_cap == 140 and meter.capacity() == 140
    assert meter.room() == 0 and meter.free() == 0  # full: nothing more until streams end
    running[0] = 130
    meter.lag_s = 0.01
    meter.observe(cpu_s=0.05, wall_s=0.25, rss_kb=0)  # on time near the cap: a little more
    assert meter.lag_cap == 148
    running[0] = 0
    meter.observe(cpu_s=0.0, wall_s=0.25, rss_kb=0)  # idle: the cap is forgotten slowly
    assert meter.lag_cap == 150


def test_a_late_worker_counts_only_what_it_starts_within_the_horizon() -> None:
    pool = PoolLoad(None, "ff:queue", every_s=0.25, pickup_timeout_s=4)
    late = WorkerLoad(running=100, room=500, started_per_s=10, finished_per_s=0, lag_ms=300, lagging=True, cpu=0.9,
                      rss_kb=0, expires_unix_ms=int((time.time() + 1) * 1000)).model_dump_json().encode()
    pool.observe({b"w1": late}, queued=15, now_unix_s=time.time())
    assert [pool.refusal() is None for _ in range(6)] == [True] * 5 + [False]  # 10/s × 2 s = 20, 15 queued


async def test_a_full_worker_takes_a_job_that_waited_half_its_pickup_deadline() -> None:
    # The API admitted it by the room last published; left waiting for room it would be a late
    # 503 `no_workers`, so it is taken past the measured capacity instead.
    meter = _meter([10], worker_loop_lag_max_ms=100)
    meter.lag_s = 0.5  # late loop: no room by measurement
    redis = FakeAsyncRedis()
    ready = "ff:queue:ready"

    async def entry(waited_s: float) -> None:
        payload = orjson.dumps({"t": 1, "f": "chat", "a": [], "k": {}, "et": int((time.time() - waited_s) * 1000)})
        await redis.delete(ready)
        await redis.rpush(ready, ready_entry("api1.job", payload))  # type: ignore[misc]

    await entry(waited_s=1.0)
    with pytest.raises(TimeoutError):  # a young job waits for room
        await asyncio.wait_for(room_or_promised(meter, redis, ready, promised_after_ms=2500), 0.6)
    await entry(waited_s=3.0)
    assert await asyncio.wait_for(room_or_promised(meter, redis, ready, promised_after_ms=2500), 2) is True
    meter.lag_s = 0.0  # room again: the usual path
    assert await asyncio.wait_for(room_or_promised(meter, redis, ready, promised_after_ms=2500), 2) is False


def test_ready_entries_tell_when_their_job_was_enqueued() -> None:
    payload = serialize_job("chat", (), {}, 1, 1234, serializer=orjson.dumps)  # as the API queues it
    assert ready_entry_enqueued_ms(ready_entry("a.b", payload)) == 1234
    assert ready_entry_enqueued_ms(ready_entry("a.b", b"not json")) is None
    assert ready_entry_enqueued_ms(ready_entry("a.b", b"[1]")) is None
