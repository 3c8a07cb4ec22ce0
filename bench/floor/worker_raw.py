"""V3 worker: RESP BLPOP/PUBLISH and a hand-written HTTP/1.1 streaming client, as raw asyncio Protocols on uvloop.

    python -m bench.floor.worker_raw REDIS_PORT UPSTREAM_PORT

The next BLPOP is sent as soon as a job arrives. Upstream connections are kept alive and reused.
The SSE events of one upstream read leave as one write of pipelined PUBLISHes.
"""

import asyncio
import contextlib
import sys
from typing import Any

import uvloop

from bench.floor.common import JOBS, UPSTREAM_PATH, assemble, decode_job
from bench.floor.resp import Resp, command


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream, carrying one job at a time."""

    def __init__(self, worker: "Worker") -> None:
        self.worker = worker
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.worker.idle:  # closed by the upstream while idle: never hand it out again
            self.worker.idle.remove(self)

    def start(self, channel: bytes, job_id: bytes, stream: bool, body: bytes) -> None:
        self.channel, self.job_id, self.stream = channel, job_id, stream
        self.buffer = bytearray()  # raw bytes: response head, then chunked encoding
        self.in_head = True
        self.sse = b""  # de-chunked bytes not yet split into events
        self.events: list[bytes] = []
        self.transport.write(self.worker.request_head % len(body) + body)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.in_head:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            del buffer[: end + 4]
            self.in_head = False
        done, pos = False, 0
        while (end := buffer.find(b"\r\n", pos)) >= 0:  # de-chunk: "<hex size>\r\n<data>\r\n", size 0 ends
            size = int(buffer[pos:end].split(b";")[0], 16)
            if size == 0:
                done, pos = True, end + 4
                break
            if len(buffer) < end + 4 + size:
                break
            self.sse += buffer[end + 2 : end + 2 + size]
            pos = end + 4 + size
        del buffer[:pos]
        out = []
        while (end := self.sse.find(b"\n\n")) >= 0:
            event, self.sse = self.sse[: end + 2], self.sse[end + 2 :]
            last = event.startswith(b"data: [DONE]")
            if self.stream:
                out.append(command(b"PUBLISH", self.channel, self.job_id + (b"e" if last else b"c") + event))
            elif not last and event.startswith(b"data: "):
                self.events.append(event[6:])
        if done and not self.stream:
            out.append(command(b"PUBLISH", self.channel, self.job_id + b"r" + assemble(self.events)))
        if out:
            self.worker.publisher.transport.write(b"".join(out))
        if done:
            self.worker.idle.append(self)


class Worker:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.request_head = (b"POST %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
                             b"content-length: %%d\r\n\r\n" % (UPSTREAM_PATH.encode(), upstream_port))
        self.idle: list[Upstream] = []
        self.publisher: Resp
        self.claimer: Resp
        self.connecting: set[asyncio.Task[Any]] = set()  # strong references to connect tasks

    def on_job(self, reply: Any) -> None:
        self.claimer.send(b"BLPOP", JOBS, b"0")  # claim the next job while this one runs
        job = decode_job(reply[1])
        if self.idle:
            self.idle.pop().start(*job)
            return
        task = asyncio.ensure_future(self.connect_and_start(*job))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def connect_and_start(self, *job: Any) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(lambda: Upstream(self), "127.0.0.1", self.upstream_port)
        upstream.start(*job)


async def main(redis_port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    worker = Worker(upstream_port)
    _, worker.publisher = await loop.create_connection(Resp, "127.0.0.1", redis_port)
    _, worker.claimer = await loop.create_connection(lambda: Resp(worker.on_job), "127.0.0.1", redis_port)
    worker.claimer.send(b"BLPOP", JOBS, b"0")
    await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
