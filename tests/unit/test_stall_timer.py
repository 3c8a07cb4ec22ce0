"""The stream's lazily moved stall timer: reads that wait past the deadline time out, and
nothing else does (a moved deadline, data already received, a real cancel)."""

import asyncio
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from router.errors import UpstreamTimeout
from router.providers.sse import BodyCaps, StreamItem, parse_sse
from router.providers.stall import StallTimer


async def read_under(stall: StallTimer, read: "asyncio.Future[bytes]") -> bytes:
    """A read as parse_sse does it: TimeoutError when the stall timer ended it."""
    stall.begin()
    try:
        return await read
    except asyncio.CancelledError:
        if stall.timed_out():
            raise TimeoutError from None
        raise
    finally:
        stall.end()


async def test_a_read_waiting_past_the_deadline_times_out() -> None:
    loop = asyncio.get_running_loop()
    stall = StallTimer(loop, loop.time() + 0.05)
    with pytest.raises(TimeoutError):
        await read_under(stall, loop.create_future())
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the timer's cancel is undone
    stall.close()


async def test_a_deadline_moved_forward_is_waited_for() -> None:
    loop = asyncio.get_running_loop()
    stall = StallTimer(loop, loop.time() + 0.05)
    read: asyncio.Future[bytes] = loop.create_future()
    loop.call_later(0.12, read.set_result, b"late but in time")
    stall.deadline = loop.time() + 0.3  # data came: the idle gap starts again
    assert await read_under(stall, read) == b"late but in time"
    stall.close()


async def test_a_deadline_passed_while_the_task_was_busy_elsewhere_only_ends_a_read_that_waits() -> None:
    loop = asyncio.get_running_loop()
    stall = StallTimer(loop, loop.time() + 0.02)
    stall.begin()
    stall.end()
    await asyncio.sleep(0.05)  # the timer fires while no read waits: nothing is cancelled
    received: asyncio.Future[bytes] = loop.create_future()
    received.set_result(b"already here")
    assert await read_under(stall, received) == b"already here"  # received data is still read
    with pytest.raises(TimeoutError):
        await read_under(stall, loop.create_future())
    stall.close()


async def test_a_cancel_of_the_task_is_not_taken_for_a_timeout() -> None:
    loop = asyncio.get_running_loop()

    async def reader() -> bytes:
        stall = StallTimer(loop, loop.time() + 10)
        try:
            return await read_under(stall, loop.create_future())
        finally:
            stall.close()

    task = asyncio.create_task(reader())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class Paced(httpx.AsyncByteStream):
    def __init__(self, pieces: list[tuple[float, bytes]]) -> None:
        self.pieces = pieces

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for delay_s, piece in self.pieces:
            await asyncio.sleep(delay_s)
            yield piece


def event(content: str) -> bytes:
    return b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": content}}]}) + b"\n\n"


async def parsed(pieces: list[tuple[float, bytes]], first_token_s: float, idle_s: float,
                 total_s: float = 10.0) -> list[StreamItem]:
    def answer(_: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Paced(pieces), headers={"content-type": "text/event-stream"})

    loop = asyncio.get_running_loop()
    got: list[StreamItem] = []
    async with (httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client,
                client.stream("POST", "http://upstream/v1/chat/completions") as response):
        started = loop.time()
        async for item in parse_sse(response, loop, started, first_token_s, idle_s, started + total_s, BodyCaps(),
                                    lambda data: ""):
            got.append(item)
    return got


@pytest.mark.parametrize(("pieces", "phase"), [
    ([(0.0, b": keep-alive\n\n"), (0.3, event("a"))], "first_token"),  # a comment is no first token
    ([(0.0, event("a")), (0.05, event("b")), (0.3, event("c"))], "idle"),
    ([(0.0, event("a")), (0.1, event("b")), (0.1, event("c")), (0.1, event("d"))], "total"),
])
async def test_a_stalled_stream_names_its_phase(pieces: list[tuple[float, bytes]], phase: str) -> None:
    with pytest.raises(UpstreamTimeout) as stalled:
        await parsed(pieces, first_token_s=0.15, idle_s=0.15, total_s=0.25)
    assert stalled.value.phase == phase


async def test_gaps_shorter_than_the_idle_timeout_never_stall_the_stream() -> None:
    got = await parsed([(0.08, event(str(n))) for n in range(6)] + [(0.0, b"data: [DONE]\n\n")],
                       first_token_s=0.15, idle_s=0.15)
    assert [item.chunk["choices"][0]["delta"]["content"] for item in got if item.chunk] == [str(n) for n in range(6)]
    assert got[-1].done
