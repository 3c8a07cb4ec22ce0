"""JobReplies: a job's reply events, taken in batches, and what its silences mean.

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

from api.dispatch import QUIET, Dispatcher, JobHandle, JobReplies, ReplyLost, WorkerLost
from api.errors import OpenAIError
from api.relay import Event, Replies, ReplyHub
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


def _job(deadline_s: float = 30.0, job_id: str = "api1.job1") -> ChatJob:
    return ChatJob(job_id=job_id, request_id="req", reply_channel="ff:reply:api1", body={"messages": []},
                   stream=True, requested_model=None, key_id="key_a", tier="free",
                   deadline_unix_ms=int((time.time() + deadline_s) * 1000))


async def _follow(redis: FakeAsyncRedis, job: ChatJob) -> tuple[Dispatcher, JobHandle, ReplyHub]:
    hub = ReplyHub(redis, process_id="api1")
    hub.connected = True  # as if subscribed; events are handed to it directly below
    dispatcher = Dispatcher(redis, hub, SETTINGS)
    return dispatcher, await dispatcher.register(job, b"payload"), hub


def _deliver(hub: ReplyHub, job: ChatJob, event_type: str, payload: bytes = b"{}") -> None:
    hub._dispatch(encode_event(job.job_id, event_type, payload))


async def _until_the_end(replies: JobReplies) -> list[Event]:
    events: list[Event] = []
    while not events or events[-1][0] not in ("done", "error"):
        events += await replies.take()
    return events


async def test_nobody_picks_the_job_up_503_and_it_is_withdrawn(redis: FakeAsyncRedis) -> None:
    job = _job()
    dispatcher, handle, _ = await _follow(redis, job)
    ready = ready_list_key(SETTINGS.queue_name)
    await redis.rpush(ready, b"other.job\nits payload", ready_entry(job.job_id, b"payload"))  # type: ignore[misc]
    with pytest.raises(OpenAIError) as raised:
        await dispatcher.follow(handle).take()
    assert (raised.value.status, raised.value.body.code) == (503, "no_workers")
    assert await redis.get(in_progress_key_prefix + job.job_id) == b"withdrawn"  # no worker may start it now
    assert await redis.lrange(ready, 0, -1) == [b"other.job\nits payload"]  # type: ignore[misc]  # its entry went


async def test_a_job_a_worker_holds_is_not_withdrawn_and_its_events_arrive_in_order(redis: FakeAsyncRedis) -> None:
    job = _job()
    await redis.set(in_progress_key_prefix + job.job_id, b"1")  # claimed; its `accepted` is late
    dispatcher, handle, hub = await _follow(redis, job)
    replies = dispatcher.follow(handle)
    asyncio.get_running_loop().call_later(0.5, _deliver, hub, job, "chunk", b"1")
    assert await replies.take() == [("chunk", b"1")]  # waited past the pickup timeout
    for n in (b"2", b"3"):
        _deliver(hub, job, "chunk", n)
    _deliver(hub, job, "done")
    # Events waiting together are taken together (one write for the stream), in order.
    assert await replies.take() == [("chunk", b"2"), ("chunk", b"3"), ("done", b"{}")]


async def test_silence_from_a_live_worker_is_waited_out(redis: FakeAsyncRedis) -> None:
    job = _job()
    await redis.set(worker_heartbeat_key("w1"), b"{}")
    dispatcher, handle, hub = await _follow(redis, job)
    _deliver(hub, job, "accepted", accepted_payload("w1"))
    loop = asyncio.get_running_loop()
    for i, at in enumerate((0.05, 0.45, 0.9)):  # silences of up to 0.45 s, liveness checked every 0.2 s
        loop.call_later(at, _deliver, hub, job, "chunk", str(i).encode())
    loop.call_later(1.0, _deliver, hub, job, "done")
    assert await _until_the_end(dispatcher.follow(handle)) == [
        ("chunk", b"0"), ("chunk", b"1"), ("chunk", b"2"), ("done", b"{}")]


async def test_a_worker_whose_heartbeat_stopped_is_lost(redis: FakeAsyncRedis) -> None:
    job = _job()
    await redis.set(worker_heartbeat_key("w1"), b"{}")
    dispatcher, handle, hub = await _follow(redis, job)
    _deliver(hub, job, "accepted", accepted_payload("w1"))
    _deliver(hub, job, "chunk", b"1")
    replies = dispatcher.follow(handle)
    assert await replies.take() == [("chunk", b"1")]
    await redis.delete(worker_heartbeat_key("w1"))  # the worker died
    with pytest.raises(WorkerLost):
        await replies.take()


async def test_past_the_deadline_and_its_grace_the_answer_is_504(redis: FakeAsyncRedis) -> None:
    job = _job(deadline_s=0.1)
    await redis.set(worker_heartbeat_key("w1"), b"{}")
    dispatcher, handle, hub = await _follow(redis, job)
    _deliver(hub, job, "accepted", accepted_payload("w1"))
    with pytest.raises(OpenAIError) as raised:  # after the deadline and 2 s for the worker's own 504
        await dispatcher.follow(handle).take()
    assert (raised.value.status, raised.value.body.code) == (504, "timeout")


async def test_the_silent_streams_of_one_worker_share_its_heartbeat_check(redis: FakeAsyncRedis,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    await redis.set(worker_heartbeat_key("w1"), b"{}")
    first, second = _job(job_id="api1.job1"), _job(job_id="api1.job2")
    dispatcher, one, hub = await _follow(redis, first)
    other = await dispatcher.register(second, b"payload")
    checks: list[str] = []
    exists = redis.exists

    async def counted(*keys: str) -> int:
        checks.extend(keys)
        return await exists(*keys)

    monkeypatch.setattr(redis, "exists", counted)
    for job in (first, second):
        _deliver(hub, job, "accepted", accepted_payload("w1"))
    loop = asyncio.get_running_loop()
    for job in (first, second):  # both silent for two liveness intervals (0.2 s), then they go on
        loop.call_later(0.5, _deliver, hub, job, "done")
    outcomes = await asyncio.gather(_until_the_end(dispatcher.follow(one)), _until_the_end(dispatcher.follow(other)))
    assert list(outcomes) == [[("done", b"{}")]] * 2
    assert checks == [worker_heartbeat_key("w1")] * 2  # one check per silence, not one per stream


async def test_a_streaming_job_is_woken_by_its_events_alone(redis: FakeAsyncRedis,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job()
    dispatcher, handle, hub = await _follow(redis, job)
    put: list[str] = []
    original = Replies.put

    def spy(self: Replies, event: Event) -> None:
        put.append(event[0])
        original(self, event)

    monkeypatch.setattr(Replies, "put", spy)
    _deliver(hub, job, "accepted", accepted_payload("w1"))  # no heartbeat: a look at a silence would fail
    replies = dispatcher.follow(handle)
    loop = asyncio.get_running_loop()
    for i in range(8):  # a chunk every 0.1 s, for four liveness intervals of 0.2 s
        loop.call_later(0.05 + i * 0.1, _deliver, hub, job, "chunk", str(i).encode())
    loop.call_later(0.85, _deliver, hub, job, "done")
    assert await _until_the_end(replies) == [*(("chunk", str(i).encode()) for i in range(8)), ("done", b"{}")]
    assert put == ["accepted", *["chunk"] * 8, "done"]  # the silence timer only re-armed itself


async def test_a_quiet_stream_gets_keepalives_and_its_events_in_between(redis: FakeAsyncRedis) -> None:
    job = _job()
    await redis.set(worker_heartbeat_key("w1"), b"{}")
    dispatcher, handle, hub = await _follow(redis, job)
    _deliver(hub, job, "accepted", accepted_payload("w1"))
    replies = dispatcher.follow(handle)
    replies.keep_alive(0.15)
    asyncio.get_running_loop().call_later(0.4, _deliver, hub, job, "chunk", b"late")
    started = time.monotonic()
    assert await replies.take() == [QUIET]
    assert await replies.take() == [QUIET]
    assert 0.25 < time.monotonic() - started < 0.4
    assert await replies.take() == [("chunk", b"late")]
    assert await replies.take() == [QUIET]  # counted again from the chunk
    assert time.monotonic() - started >= 0.55


async def test_events_before_a_lost_subscription_go_out_first(redis: FakeAsyncRedis) -> None:
    job = _job()
    dispatcher, handle, hub = await _follow(redis, job)
    _deliver(hub, job, "accepted", accepted_payload("w1"))
    _deliver(hub, job, "chunk", b"1")
    handle.replies.put(("lost", b""))  # as the hub does for every job when its subscription drops
    replies = dispatcher.follow(handle)
    assert await replies.take() == [("chunk", b"1")]
    with pytest.raises(ReplyLost):
        await replies.take()
