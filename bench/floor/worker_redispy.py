"""V1/V2 worker: redis-py asyncio (hiredis); the upstream call with httpx (V1) or aiohttp (V2).

    python -m bench.floor.worker_redispy REDIS_PORT UPSTREAM_PORT httpx|aiohttp

A BLPOP loop claims jobs atomically and runs each in its own task. A streaming job PUBLISHes every
SSE event as it arrives (awaited one by one, so order holds); a non-streaming job assembles the
events into one chat.completion and PUBLISHes that once.
"""

import asyncio
import contextlib
import functools
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import httpx
import redis.asyncio as aioredis
import uvloop

from bench.floor.common import JOBS, UPSTREAM_PATH, assemble, decode_job

HEADERS = {"content-type": "application/json"}
Chunks = Callable[[bytes], AsyncIterator[bytes]]


async def httpx_chunks(client: httpx.AsyncClient, url: str, body: bytes) -> AsyncIterator[bytes]:
    async with client.stream("POST", url, content=body, headers=HEADERS) as response:
        async for data in response.aiter_raw():
            yield data


async def aiohttp_chunks(session: aiohttp.ClientSession, url: str, body: bytes) -> AsyncIterator[bytes]:
    async with session.post(url, data=body, headers=HEADERS) as response:
        async for data in response.content.iter_any():
            yield data


async def handle(redis: aioredis.Redis, chunks: Chunks, job: bytes) -> None:
    channel, job_id, stream, body = decode_job(job)
    buffer = b""
    events: list[bytes] = []
    async for data in chunks(body):
        buffer += data
        while (end := buffer.find(b"\n\n")) >= 0:
            event, buffer = buffer[: end + 2], buffer[end + 2 :]
            done = event.startswith(b"data: [DONE]")
            if stream:
                await redis.publish(channel, job_id + (b"e" if done else b"c") + event)
            elif not done and event.startswith(b"data: "):
                events.append(event[6:])
    if not stream:
        await redis.publish(channel, job_id + b"r" + assemble(events))


async def main(redis_port: int, upstream_port: int, client_kind: str) -> None:
    url = f"http://127.0.0.1:{upstream_port}{UPSTREAM_PATH}"
    publisher = aioredis.Redis(port=redis_port)
    claimer = aioredis.Redis(port=redis_port)  # a connection of its own: BLPOP blocks it
    chunks: Chunks
    if client_kind == "httpx":
        # No timeouts in the worker, as in V3: the client's own 30 s timeout ends a hung request.
        chunks = functools.partial(httpx_chunks, httpx.AsyncClient(timeout=None), url)  # noqa: S113
    else:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        chunks = functools.partial(aiohttp_chunks, session, url)
    tasks: set[asyncio.Task[Any]] = set()  # strong references: the loop only keeps weak ones
    while True:
        _, job = await claimer.blpop([JOBS], 0)  # type: ignore[misc]
        task = asyncio.create_task(handle(publisher, chunks, job))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
