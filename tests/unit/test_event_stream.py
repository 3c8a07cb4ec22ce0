"""EventStreamResponse: a job's events to the socket, in order, with the stream's end and failures in-band."""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fakeredis import FakeAsyncRedis

from api.dialects.base import ChatStream
from api.dispatch import Dispatcher, JobHandle
from api.event_stream import EventStreamResponse
from api.metrics import DIRECT_BODY_SEND
from api.relay import ReplyHub
from settings import Settings
from workers.protocol import (
    ChatJob,
    accepted_payload,
    cancel_message,
    control_channel,
    encode_event,
    worker_heartbeat_key,
)

SETTINGS = Settings(_env_file=None, pickup_timeout_s=0.3, worker_liveness_check_s=0.2)  # type: ignore[call-arg]
DONE = b'{"route": {"model": "m", "provider": "p", "attempts": 1}}'
Message = dict[str, Any]


class Usage:
    """What the stream told the request's usage recorder."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.done = None

    async def note(self, event_type: str, payload: bytes) -> None:
        self.calls.append(event_type)

    async def failed(self) -> None:
        self.calls.append("failed")

    async def abandoned(self) -> None:
        self.calls.append("abandoned")


class PingingStream(ChatStream):
    keepalive_s = 0.1

    def keepalive(self) -> bytes:
        return b": ping\n\n"


class Caller:
    """The ASGI server's side: what the app sent, by which send, and a caller that may leave."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Message]] = []
        self.ended = asyncio.Event()
        self.left = asyncio.Event()

    def send_via(self, name: str) -> Any:
        async def send(message: Message) -> None:
            self.sent.append((name, message))
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.ended.set()

        return send

    async def receive(self) -> Message:
        ended, left = asyncio.ensure_future(self.ended.wait()), asyncio.ensure_future(self.left.wait())
        await asyncio.wait({ended, left}, return_when=asyncio.FIRST_COMPLETED)
        ended.cancel()
        left.cancel()
        return {"type": "http.disconnect"}

    def bodies(self) -> list[tuple[str, bytes, bool]]:
        return [(name, m["body"], m["more_body"]) for name, m in self.sent if m["type"] == "http.response.body"]


@pytest.fixture
async def redis() -> AsyncIterator[FakeAsyncRedis]:
    client = FakeAsyncRedis()
    yield client
    await client.aclose()


async def _streaming(redis: FakeAsyncRedis, stream: ChatStream | None = None,
                     ) -> tuple[EventStreamResponse, JobHandle, ReplyHub, Usage]:
    """The response as the route hands it over: at the job's first chunk (b'{"n": 1}')."""
    job = ChatJob(job_id="api1.job1", request_id="req", reply_channel="ff:reply:api1", body={"messages": []},
                  stream=True, requested_model=None, key_id="key_a", tier="free",
                  deadline_unix_ms=int((time.time() + 30) * 1000))
    hub = ReplyHub(redis, process_id="api1")
    hub.connected = True
    dispatcher = Dispatcher(redis, hub, SETTINGS)
    handle = await dispatcher.register(job, b"payload")
    await redis.set(worker_heartbeat_key("w1"), b"{}")
    _deliver(hub, "accepted", accepted_payload("w1"))
    _deliver(hub, "chunk", b'{"n": 1}')
    replies = dispatcher.follow(handle)
    first = await replies.take()
    usage = Usage()
    response = EventStreamResponse(stream or ChatStream(), first, replies, handle, dispatcher, usage,
                                   {"x-request-id": "req"})
    return response, handle, hub, usage


def _deliver(hub: ReplyHub, event_type: str, payload: bytes = b"{}") -> None:
    hub._dispatch(encode_event("api1.job1", event_type, payload))


async def _serve(response: EventStreamResponse, caller: Caller) -> None:
    scope = {"type": "http", DIRECT_BODY_SEND: caller.send_via("direct")}
    await response(scope, caller.receive, caller.send_via("chain"))


async def test_events_that_came_together_go_out_in_one_write_in_order(redis: FakeAsyncRedis) -> None:
    response, handle, hub, usage = await _streaming(redis)
    caller = Caller()
    served = asyncio.ensure_future(_serve(response, caller))
    await asyncio.sleep(0.05)
    for n in (b"2", b"3"):
        _deliver(hub, "chunk", b'{"n": ' + n + b"}")
    _deliver(hub, "done", DONE)
    await asyncio.wait_for(served, 5)
    assert [m["type"] for _, m in caller.sent][:1] == ["http.response.start"]
    # The head and the first body pass every middleware; later writes go to the direct send. The
    # stream's end goes out with its last bytes.
    assert caller.bodies() == [("chain", b'data: {"n": 1}\n\n', True),
                               ("direct", b'data: {"n": 2}\n\ndata: {"n": 3}\n\ndata: [DONE]\n\n', False)]
    assert usage.calls == ["done", "abandoned"]  # billed before the bytes; abandoned is a no-op once recorded
    assert handle.finished
    assert hub.in_flight == 0  # released


async def test_a_quiet_stream_gets_its_dialects_keepalive(redis: FakeAsyncRedis) -> None:
    response, _, hub, _ = await _streaming(redis, PingingStream())
    caller = Caller()
    served = asyncio.ensure_future(_serve(response, caller))
    asyncio.get_running_loop().call_later(0.35, _deliver, hub, "done", DONE)
    await asyncio.wait_for(served, 5)
    written = b"".join(body for _, body, _ in caller.bodies())
    assert written.startswith(b'data: {"n": 1}\n\n: ping\n\n: ping\n\n')
    assert written.endswith(b"data: [DONE]\n\n")


async def test_a_caller_who_leaves_ends_the_stream_and_cancels_the_job(redis: FakeAsyncRedis) -> None:
    response, handle, hub, usage = await _streaming(redis)
    cancels = redis.pubsub()
    await cancels.subscribe(control_channel("w1"))
    assert (await cancels.get_message(timeout=1) or {}).get("type") == "subscribe"
    caller = Caller()
    served = asyncio.ensure_future(_serve(response, caller))
    await asyncio.sleep(0.05)
    caller.left.set()
    await asyncio.wait_for(served, 5)
    assert caller.bodies()[-1][2] is False  # the response is ended (the server drops it: nobody listens)
    assert usage.calls == ["abandoned"]  # the request happened; no outcome came
    assert not handle.finished
    assert hub.in_flight == 0
    message = await cancels.get_message(timeout=1)
    assert message is not None
    assert message["data"] == cancel_message("api1.job1")  # its worker is told to stop
    await cancels.aclose()


@pytest.mark.parametrize(("fate", "code"), [("worker_lost", "worker_lost"), ("error_event", "upstream_failed")])
async def test_a_failure_after_the_first_chunk_is_in_band_without_done(redis: FakeAsyncRedis, fate: str,
                                                                       code: str) -> None:
    response, _, hub, usage = await _streaming(redis)
    caller = Caller()
    served = asyncio.ensure_future(_serve(response, caller))
    _deliver(hub, "chunk", b'{"n": 2}')
    await asyncio.sleep(0.05)
    if fate == "worker_lost":
        await redis.delete(worker_heartbeat_key("w1"))  # its next silence finds it gone
    else:
        _deliver(hub, "error", b'{"status": 502, "error": {"message": "x", "type": "upstream_error", '
                               b'"code": "upstream_failed"}}')
    await asyncio.wait_for(served, 5)
    *_, (_, last, more) = caller.bodies()
    assert not more
    assert last.startswith(b'data: {"error":{') and code.encode() in last
    written = b"".join(body for _, body, _ in caller.bodies())
    assert written.startswith(b'data: {"n": 1}\n\ndata: {"n": 2}\n\n')
    assert b"[DONE]" not in written
    assert usage.calls[0] == ("failed" if fate == "worker_lost" else "error")
