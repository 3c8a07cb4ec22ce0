"""One writer for every reply event a worker publishes: a dedicated connection, batched writes."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from settings.logfields import STORE_DOWN

log = logging.getLogger("freeference.worker")

Command = tuple[str | bytes, ...]


class Reply(Protocol):
    """Where a command's reply goes: an asyncio.Future, or anything that takes replies the same way."""

    def done(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


# A command (PUBLISH channel message, or any other), or what builds it when its batch is written
# (a chunk that later text may still join: workers/coalesce.py), and where its reply goes.
_Pending = tuple[Command | Callable[[], Command], Reply]
# A connection unused this long is checked (one non-blocking read) before the next batch.
_IDLE_CHECK_S = 0.25
# A batch (one write, then its replies) that takes longer than this fails, and the connection
# is dropped and re-made for the next one.
_BATCH_TIMEOUT_S = 5.0


def resp_commands(commands: list[Command]) -> bytes:
    """Commands in Redis's wire format, packed in one buffer.

    redis-py's pack_commands builds a list of pieces per argument through its encoder, in
    Python, for every chunk of every stream; a PUBLISH needs only its three arguments' lengths.
    """
    out = bytearray()
    for command in commands:
        out += b"*%d\r\n" % len(command)
        for arg in command:
            data = arg if isinstance(arg, bytes) else arg.encode()
            out += b"$%d\r\n" % len(data)
            out += data
            out += b"\r\n"
    return bytes(out)


class EventPublisher:
    """PUBLISHes for all of this worker's jobs over one connection, in the order they were asked.

    Every chunk of every stream is a PUBLISH. Through the shared pool each one paid for a pool
    checkout (a lock plus a non-blocking read to check the connection) and a write of its own:
    a third of a worker's CPU with 100 streams in flight (docs/performance.md). Here one task
    owns one connection and sends whatever is queued as one write, then hands each caller the
    number of subscribers that got its message (how a job notices that its API process is gone).
    Order is kept: a job's events leave in the order it published them.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._queue: list[_Pending] = []
        self._queued = asyncio.Event()
        self._connection: AbstractConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_sent = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="event-publisher")

    def submit(self, channel: str, message: bytes) -> "asyncio.Future[int]":
        """Queue a PUBLISH of `message`; the future gives the number of subscribers that got it."""
        return self.submit_command("PUBLISH", channel, message)

    def submit_command(self, *command: str | bytes) -> "asyncio.Future[Any]":
        """Queue any command to go out with the next batch; the future gives its reply.

        Bookkeeping writes of a job (its health, its arq keys) ride this way in the same write
        as the job's last event, instead of a round trip each after it.
        """
        return self.submit_built(command)

    def submit_built(self, command: Command | Callable[[], Command]) -> "asyncio.Future[Any]":
        """Queue a command, or a callable that builds it the moment its batch is written."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit_to(command, future)
        return future

    def submit_to(self, command: Command | Callable[[], Command], reply: Reply) -> None:
        """Queue a command whose reply goes to `reply`, called in order as replies arrive.

        A stream's chunks hand their replies to one object of their job's instead of a future
        each: a future, its done-callback and its wake-up per chunk were a measurable share of
        a worker's CPU at a thousand streams (docs/performance.md).
        """
        if self._task is None or self._task.done():
            raise RedisConnectionError("the event publisher is not running")
        self._queue.append((command, reply))
        self._queued.set()

    async def publish(self, channel: str, message: bytes) -> int:
        """PUBLISH `message`; the number of subscribers that received it."""
        return await self.submit(channel, message)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, future in self._queue:
            if not future.done():
                future.set_exception(RedisConnectionError("the event publisher has stopped"))
        self._queue = []
        if self._connection is not None:
            # Replies of a cancelled batch may still be unread: never hand this one back.
            with contextlib.suppress(RedisError, OSError):
                await self._connection.disconnect()
            await self._pool.release(self._connection)
            self._connection = None

    async def _run(self) -> None:
        while True:
            await self._queued.wait()
            self._queued.clear()
            taken, self._queue = self._queue, []
            batch = self._built(taken)
            if batch:
                try:
                    await self._send(batch)
                except Exception as exc:  # a bug here must fail these callers, not strand every later one
                    log.exception("event publisher failed")
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)

    @staticmethod
    def _built(taken: list[tuple[Command | Callable[[], Command], Reply]]) -> list[tuple[Command, Reply]]:
        """The commands to write, built now; a builder that raises fails its own caller only.

        Built outside the batch's error handling, one failing builder ended this task, and every
        job of the worker then waited on a publisher that no longer ran.
        """
        batch: list[tuple[Command, Reply]] = []
        for command, reply in taken:
            try:
                batch.append((command if isinstance(command, tuple) else command(), reply))
            except Exception as exc:
                log.exception("event not built")
                if not reply.done():
                    reply.set_exception(exc)
        return batch

    async def _send(self, batch: list[tuple[Command, Reply]]) -> None:
        try:
            if self._connection is None:
                self._connection = await self._pool.get_connection()
            elif time.monotonic() - self._last_sent > _IDLE_CHECK_S:
                # What the pool does on every checkout, only after a pause: a connection that
                # sat idle through a Redis restart is reconnected before it loses a batch.
                await self._pool.ensure_connection(self._connection)
            connection = self._connection
            self._last_sent = time.monotonic()
            # The connection reconnects by itself on the next send after a failure. The bound
            # matters: every job of this worker waits on this one connection, so a half-open
            # socket (a partition, an isolated old master) must fail a batch, not stall them all.
            async with asyncio.timeout(_BATCH_TIMEOUT_S):
                await connection.send_packed_command(resp_commands([c for c, _ in batch]), check_health=False)
                for command, future in batch:
                    try:
                        reply = await connection.read_response()
                    except ResponseError as refused:  # this command's own error reply: the rest are fine
                        if not future.done():
                            future.set_exception(refused)
                        continue
                    if not future.done():  # its job may have been cancelled meanwhile
                        future.set_result(int(reply) if command[0] == "PUBLISH" else reply)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("publishing %d events failed (%s)", len(batch), type(exc).__name__, extra=STORE_DOWN)
            if self._connection is not None:
                with contextlib.suppress(RedisError, OSError):
                    await self._connection.disconnect()
            error = exc if isinstance(exc, RedisError) else RedisConnectionError(type(exc).__name__)
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
