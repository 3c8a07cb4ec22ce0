"""V3 API: raw asyncio Protocols on uvloop; a hand-written HTTP/1.1 server and RESP, no libraries.

    python -m bench.floor.api_raw REDIS_PORT PORT

Same shape as V1's API: one LPUSH per request (written without waiting for its reply), one pub/sub
channel per process. A reply is written to the client's transport straight from the pub/sub callback.
"""

import asyncio
import contextlib
import itertools
import os
import sys
from typing import Any

import orjson
import uvloop

from bench.floor.common import JOBS, decode_reply, encode_job
from bench.floor.resp import Resp


class Waiting:
    __slots__ = ("started", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.started = False  # a stream's response head has been written


class Api:
    def __init__(self) -> None:
        self.channel = b"reply:" + os.urandom(4).hex().encode()
        self.ids = itertools.count()
        self.pending: dict[bytes, Waiting] = {}
        self.subscribed = asyncio.get_running_loop().create_future()
        self.commands: Resp

    def on_request(self, transport: asyncio.Transport, body: bytes) -> None:
        stream = bool(orjson.loads(body).get("stream"))
        job_id = b"%016x" % next(self.ids)
        self.pending[job_id] = Waiting(transport)
        self.commands.send(b"LPUSH", JOBS, encode_job(self.channel, job_id, stream, body))

    def on_pubsub(self, value: Any) -> None:
        if value[0] == b"subscribe":
            self.subscribed.set_result(None)
        if value[0] != b"message":
            return
        data = value[2]
        job_id, kind, payload = decode_reply(data)
        waiting = self.pending.get(job_id)
        if waiting is None:
            return
        if kind == b"r":
            del self.pending[job_id]
            waiting.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                    % (len(payload), payload))
            return
        out = b"%x\r\n%s\r\n" % (len(payload), payload)
        if not waiting.started:
            waiting.started = True
            out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + out
        if kind == b"e":
            del self.pending[job_id]
            out += b"0\r\n\r\n"
        waiting.transport.write(out)


class Http(asyncio.Protocol):
    """HTTP/1.1 keep-alive server side: enough for POST with content-length from one client."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.buffer = bytearray()
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = 0
            for line in bytes(self.buffer[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            self.api.on_request(self.transport, body)


async def main(redis_port: int, port: int) -> None:
    loop = asyncio.get_running_loop()
    api = Api()
    _, api.commands = await loop.create_connection(Resp, "127.0.0.1", redis_port)
    _, subscriber = await loop.create_connection(lambda: Resp(api.on_pubsub), "127.0.0.1", redis_port)
    subscriber.send(b"SUBSCRIBE", api.channel)
    await api.subscribed
    server = await loop.create_server(lambda: Http(api), "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
