"""V1/V2 API: a raw ASGI app (no framework) on uvicorn with uvloop and httptools; redis-py asyncio with hiredis.

    python -m bench.floor.api_asgi REDIS_PORT PORT

A request costs one LPUSH. Replies come on one pub/sub channel per process, subscribed at startup,
and one reader task hands each to the request waiting for its job id: no per-request SUBSCRIBE.
"""

import asyncio
import itertools
import os
import sys
from typing import Any

import orjson
import redis.asyncio as aioredis
import uvicorn

from bench.fake_upstream import read_body
from bench.floor.common import JOBS, decode_reply, encode_job


class Api:
    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.channel = b"reply:" + os.urandom(4).hex().encode()
        self.ids = itertools.count()
        # job id -> Future of the whole answer (non-streaming) | Queue of (kind, SSE event) (streaming)
        self.pending: dict[bytes, Any] = {}
        self.redis: aioredis.Redis
        self.reader: asyncio.Task[None]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        body = await read_body(receive)
        stream = bool(orjson.loads(body).get("stream"))
        job_id = b"%016x" % next(self.ids)
        waiter: Any = asyncio.Queue() if stream else asyncio.get_running_loop().create_future()
        self.pending[job_id] = waiter
        await self.redis.lpush(JOBS, encode_job(self.channel, job_id, stream, body))  # type: ignore[misc]
        if not stream:
            answer = await waiter
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]})
            await send({"type": "http.response.body", "body": answer})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        while True:
            kind, event = await waiter.get()
            last = kind == b"e"
            if last:
                del self.pending[job_id]
            await send({"type": "http.response.body", "body": event, "more_body": not last})
            if last:
                return

    async def lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.redis = aioredis.Redis(port=self.redis_port)
                pubsub = self.redis.pubsub()
                await pubsub.subscribe(self.channel)
                self.reader = asyncio.create_task(self.read_replies(pubsub))
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def read_replies(self, pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            data = message["data"]
            job_id, kind, payload = decode_reply(data)
            waiter = self.pending.get(job_id)
            if waiter is None:
                continue
            if kind == b"r":
                del self.pending[job_id]
                waiter.set_result(payload)
            else:
                waiter.put_nowait((kind, payload))


if __name__ == "__main__":
    redis_port, port = int(sys.argv[1]), int(sys.argv[2])
    uvicorn.run(Api(redis_port), host="127.0.0.1", port=port, loop="uvloop", http="httptools", lifespan="on",
                log_level="warning", access_log=False, timeout_graceful_shutdown=1)
