"""The API side of the reply path: one pub/sub subscription per process, demultiplexed by job id."""

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from settings.logfields import STORE_DOWN, STORE_UP
from workers.protocol import reply_channel, split_event

log = logging.getLogger("freeference.relay")

Event = tuple[str, bytes]  # (event_type, payload)
# Put into every job's replies when the subscription drops: their events may be gone.
LOST: Event = ("lost", b"")
# Put into a job's replies by its route when the caller disconnects.
CALLER_LEFT: Event = ("caller_left", b"")


class Replies:
    """One job's events as they arrive: a list the hub appends to, taken whole by the job's one reader.

    Lighter than an asyncio.Queue (three deques, a lock-step get per event): the reader is woken
    once for everything that came meanwhile, and a waiting future exists only while it waits.
    """

    __slots__ = ("_events", "_waiter")

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, event: Event) -> None:
        self._events.append(event)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def take(self) -> list[Event]:
        """Every event since the last take, in order; waits for one if there is none."""
        if not self._events:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        events, self._events = self._events, []
        return events


class ReplyHub:
    """Receives every reply event for this API process and hands it to the waiting request."""

    def __init__(self, redis: Redis, process_id: str) -> None:
        self._redis = redis
        self.process_id = process_id
        self.channel = reply_channel(process_id)
        self._replies: dict[str, Replies] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self.connected = False

    async def start(self) -> None:
        """Subscribe (and wait for the confirmation) before any job can be enqueued."""
        self._task = asyncio.create_task(self._run(), name="reply-hub")
        await asyncio.wait_for(self._subscribed.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def ready(self, timeout_s: float) -> bool:
        """True once the reply channel is subscribed (waits up to timeout_s for a resubscribe)."""
        if self.connected:
            return True
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout=timeout_s)
        except TimeoutError:
            return False
        return self.connected

    def register(self, job_id: str) -> Replies:
        replies = self._replies[job_id] = Replies()
        return replies

    def unregister(self, job_id: str) -> None:
        self._replies.pop(job_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._replies)

    async def _subscribe(self) -> PubSub:
        pubsub = self._redis.pubsub()
        await pubsub.subscribe(self.channel)
        # The confirmation proves the server registered us: from here no message is lost.
        while True:
            message = await pubsub.get_message(timeout=5)
            if message and message["type"] == "subscribe":
                return pubsub

    async def _run(self) -> None:
        backoff_s = 0.05
        while True:
            pubsub: PubSub | None = None
            try:
                pubsub = await self._subscribe()
                log.info("reply channel subscribed", extra=STORE_UP)  # logged only after an outage
                self.connected = True
                self._subscribed.set()
                backoff_s = 0.05
                await self._relay(pubsub)
            except (RedisConnectionError, RedisTimeoutError, OSError, RedisError) as exc:
                # Redis restarted or the network blinked: resubscribe. Events published in the
                # gap are lost, so every waiter is told at once (LOST) instead of hanging.
                self.connected = False
                self._subscribed.clear()
                for replies in self._replies.values():
                    replies.put(LOST)
                log.warning("reply channel lost (%s); resubscribing", type(exc).__name__, extra=STORE_DOWN)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _relay(self, pubsub: PubSub) -> None:
        """Hand every message on the subscribed connection to its waiter, until the connection fails.

        Reads the connection directly rather than through PubSub.get_message: that wraps each
        message in a health check, a retry closure and a dict, a cost paid for every chunk of
        every stream. A blocking read never runs get_message's health check anyway, and the
        reply channel is the only subscription on this connection.
        """
        connection = pubsub.connection
        if connection is None:
            raise RedisConnectionError("the reply subscription has no connection")
        while True:
            response = await connection.read_response()
            # [b"message", channel, data]; anything else (a late confirmation) carries no event.
            if isinstance(response, list) and len(response) == 3 and response[0] == b"message":
                self._dispatch(response[2])

    def _dispatch(self, data: bytes) -> None:
        try:
            job_id, event_type, payload = split_event(data)
        except ValueError:
            log.warning("dropping malformed reply message (%d bytes)", len(data))
            return
        replies = self._replies.get(job_id)
        if replies is not None:  # otherwise the caller already left
            replies.put((event_type, payload))


class Deadline:
    """A monotonic deadline derived from a wall-clock one (the job carries unix ms)."""

    def __init__(self, unix_ms: int) -> None:
        self._at = time.monotonic() + (unix_ms / 1000 - time.time())

    def remaining_s(self) -> float:
        return self._at - time.monotonic()
