"""Dispatcher.events: a job's reply events, and what its silences mean.

Before a worker takes the job, silence past the pickup timeout withdraws it (503 no_workers)
unless a worker holds it; after, every silence checks the worker's heartbeat (WorkerLost when
it is gone); past the deadline (+2 s of grace) the answer is 504.
"""

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from arq.constants import in_progress_key_prefix
from fakeredis import FakeAsyncRedis

from api.dispatch import Dispatcher, JobHandle, WorkerLost
from api.errors import OpenAIError
from api.relay import ReplyHub
from settings import Settings
from workers.protocol import (
    ChatJob,
    accepted_payload,
    encode_event,
    ready_entry,
    ready_list_key,
    worker_heartbeat_key,
)

SETTINGS = Settings(_env_file=None, pickup_timeout_s=0.3, worker_liveness_check_s=0.2)  # type: ignore[call-arg]


@pytest.fixture
async def redis() -> AsyncIterator[FakeAsyncRedis]:
    client = FakeAsyncRedis()
    yield client
    await client.aclose()


def _job(deadline_s: float = 30.0) -> ChatJob:
    return ChatJob(job_id="api1.job1", request_id="req", reply_channel="ff:reply:api1", body={"messages": []},
                   stream=True, requested_model=None, key_id="key_a", tier="free",
                   deadline_unix_ms=int((time.time() + deadline_s) * 1000))


async def _follow(redis: FakeAsyncRedis, job: ChatJob) -> tuple[Dispatcher, JobHandle, ReplyHub]:
    hub = ReplyHub(redis, process_id="api1")
    hub.connected = True  # as if subscribed; events are handed to it directly below
    dispatcher = Dispatcher(redis, hub, SETTINGS)
    return dispatcher, await dispatcher.register(job, b"payload"), hub


def _deliver(hub: ReplyHub, job: ChatJob, event_type: str, payload: bytes = b"{}") -> None:
    hub._dispatch(encode_event(job.job_id, event_type, payload))


async def test_nobody_picks_the_job_up_503_and_it_is_withdrawn(redis: FakeAsyncRedis) -> None:
    job = _job()
    dispatcher, handle, _ = await _follow(redis, job)
    ready = ready_list_key(SETTINGS.queue_name)
    await redis.rpush(ready, b"other.job\nits payload", ready_entry(job.job_id, b"payload"))  # type: ignore[misc]
    with pytest.raises(OpenAIError) as raised:
        await anext(dispatcher.events(handle))
    assert (raised.value.status, raised.value.body.code) == (503, "no_workers")
    assert await redis.get(in_progress_key_prefix + job.job_id) == b"withdrawn"  # no worker may start it now
    assert await redis.lrange(ready, 0, -1) == [b"other.job\nits payload"]  # type: ignore[misc]  # its entry went


async def test_a_job_a_worker_holds_is_not_withdrawn_and_its_events_arrive_in_order(redis: FakeAsyncRedis) -> None:
    job = _job()
    await redis.set(in_progress_key_prefix + job.job_id, b"1")  # claimed; its `accepted` is late
    dispatcher, handle, hub = await _follow(redis, job)
    events = dispatcher.events(handle)
    asyncio.get_running_loop().call_later(0.5, _deliver, hub, job, "chunk", b"1")
    assert await anext(events) == ("chunk", b"1")  # waited past the pickup timeout
    for n in (b"2", b"3"):
        _deliver(hub, job, "chunk", n)
    _deliver(hub, job, "done")
    # Chunks waiting together go on as one event, one per line, still before the done.
    assert [e async for e in events] == [("chunk", b"2\n3"), ("done", b"{}")]


async def test_silence_from_a_live_worker_is_waited_out(redis: FakeAsyncRedis) -> None:
    job = _job()
    await redis.set(worker_heartbeat_key("w1"), b"{}")
    dispatcher, handle, hub = await _follow(redis, job)
    _deliver(hub, job, "accepted", accepted_payload("w1"))
    loop = asyncio.get_running_loop()
    for i, at in enumerate((0.05, 0.45, 0.9)):  # silences of up to 0.45 s, liveness checked every 0.2 s
        loop.call_later(at, _deliver, hub, job, "chunk", str(i).encode())
    loop.call_later(1.0, _deliver, hub, job, "done")
    assert [e async for e in dispatcher.events(handle)] == [
        ("chunk", b"0"), ("chunk", b"1"), ("chunk", b"2"), ("done", b"{}")]


async def test_a_worker_whose_heartbeat_stopped_is_lost(redis: FakeAsyncRedis) -> None:
    job = _job()
    await redis.set(worker_heartbeat_key("w1"), b"{}")
    dispatcher, handle, hub = await _follow(redis, job)
    _deliver(hub, job, "accepted", accepted_payload("w1"))
    _deliver(hub, job, "chunk", b"1")
    events = dispatcher.events(handle)
    assert await anext(events) == ("chunk", b"1")
    await redis.delete(worker_heartbeat_key("w1"))  # the worker died
    with pytest.raises(WorkerLost):
        await anext(events)


async def test_past_the_deadline_and_its_grace_the_answer_is_504(redis: FakeAsyncRedis) -> None:
    job = _job(deadline_s=0.1)
    await redis.set(worker_heartbeat_key("w1"), b"{}")
    dispatcher, handle, hub = await _follow(redis, job)
    _deliver(hub, job, "accepted", accepted_payload("w1"))
    with pytest.raises(OpenAIError) as raised:  # after the deadline and 2 s for the worker's own 504
        await anext(dispatcher.events(handle))
    assert (raised.value.status, raised.value.body.code) == (504, "timeout")
