"""Enqueue a chat job and follow it: pickup deadline, worker liveness, cancellation."""

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import orjson
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.errors import OpenAIError
from api.metrics import note_event, note_submitted
from api.relay import CALLER_LEFT, Deadline, Event, ReplyHub
from settings import Settings
from settings.logfields import STORE_DOWN
from workers.protocol import (
    ARQ_JOB_FUNCTION,
    AcceptedEvent,
    ChatJob,
    cancel_message,
    cancelled_job_key,
    control_channel,
    ready_entry,
    ready_list_key,
    worker_heartbeat_key,
)

log = logging.getLogger("freeference.dispatch")


# KEYS: in-progress key, queue, job key, ready list. ARGV: job id, its ready-list entry. The
# entry goes too, so a queue nobody serves does not keep the payloads of withdrawn jobs.
_WITHDRAW_LUA = """
if redis.call('SET', KEYS[1], 'withdrawn', 'NX', 'PX', 60000) then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3])
  redis.call('LREM', KEYS[4], 1, ARGV[2])
  return 1
end
return 0
"""


# Put into a job's queue by its silence timer (Dispatcher.events): look at the silence now.
_LOOK: Event = ("look", b"")


class WorkerLost(Exception):
    """The worker running a job stopped heart-beating before the job finished."""


class ReplyLost(WorkerLost):
    """The reply subscription dropped (Redis restart): this job's events may be lost."""


def no_workers() -> OpenAIError:
    return OpenAIError(
        503,
        "No worker picked up the request in time; the gateway's worker pool is down or saturated.",
        code="no_workers",
        headers={"Retry-After": "2"},
    )


@dataclass
class JobHandle:
    job: ChatJob
    queue: asyncio.Queue[Event]
    payload: bytes = b""  # as queued (Dispatcher.serialize): names its ready-list entry
    worker_id: str | None = None
    finished: bool = False


def _join_waiting_chunks(payload: bytes, queue: "asyncio.Queue[Event]") -> tuple[bytes, Event | None]:
    """A chunk and the chunks queued right behind it as one event, their payloads one per line.

    When this process falls behind a stream, its chunks wait in the job's queue; relaying them
    one by one costs a pass through every generator and middleware of the response per chunk.
    Joined, they go out in one write (as separate SSE events: api/pipeline.py splits the lines).
    A chunk's payload is one line of JSON (workers serialize with orjson), so a newline cannot
    be part of one. Returns the joined payload and the first non-chunk event taken, if any.
    """
    parts = [payload]
    while queue.qsize():
        event = queue.get_nowait()
        if event[0] != "chunk":
            return b"\n".join(parts), event
        parts.append(event[1])
    return b"\n".join(parts), None


class Dispatcher:
    """Puts jobs on the arq queue and yields their reply events."""

    def __init__(self, redis: Redis, hub: ReplyHub, settings: Settings) -> None:
        self._redis = redis
        self._hub = hub
        self._settings = settings
        self._withdraw_script = redis.register_script(_WITHDRAW_LUA)

    async def submit(self, job: ChatJob) -> JobHandle:
        """Register for replies, then enqueue (arq's own job format) and hand it to a worker."""
        payload, ttl_ms, now_ms = self.serialize(job)
        handle = await self.register(job, payload)
        ready = ready_list_key(self._settings.queue_name)
        # One round trip instead of arq's WATCH/MULTI: job ids are fresh uuids, so the
        # "already exists" check in ArqRedis.enqueue_job cannot fire.
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.psetex(job_key_prefix + job.job_id, ttl_ms, payload)
                pipe.zadd(self._settings.queue_name, {job.job_id: now_ms})
                pipe.rpush(ready, ready_entry(job.job_id, payload))  # an idle worker's blocking pop takes it
                pipe.pexpire(ready, ttl_ms)
                await pipe.execute()
        except BaseException:
            self._hub.unregister(job.job_id)
            raise
        note_submitted()
        return handle

    async def register(self, job: ChatJob, payload: bytes) -> JobHandle:
        """Listen for a job's events (`payload`: as it will be queued); before it is enqueued, so none is missed."""
        # A job enqueued while the reply subscription is down would lose its events.
        if not await self._hub.ready(timeout_s=2.0):
            raise OpenAIError(503, "The gateway lost its connection to Redis; please retry.",
                              code="store_unavailable", headers={"Retry-After": "1"})
        return JobHandle(job=job, queue=self._hub.register(job.job_id), payload=payload)

    def serialize(self, job: ChatJob) -> tuple[bytes, int, int]:
        """(arq payload, job key TTL ms, enqueue time ms) for a job about to be queued."""
        now_ms = int(time.time() * 1000)
        payload = serialize_job(ARQ_JOB_FUNCTION, (job.model_dump(mode="json"),), {}, 1, now_ms,
                                serializer=orjson.dumps)
        return payload, max(job.deadline_unix_ms - now_ms, 1000) + 60_000, now_ms

    def enqueued(self) -> None:
        """The admission script queued this registered job (see api/admission.py)."""
        note_submitted()

    def abandon(self, handle: JobHandle) -> None:
        """A registered job that was never queued."""
        self._hub.unregister(handle.job.job_id)

    async def events(self, handle: JobHandle) -> AsyncGenerator[Event, None]:
        """Reply events until the job ends; raises 503 / WorkerLost / 504 as the job's fate says.

        Silences are watched by one timer per job, not one per event: a paced stream's queue is
        empty at every wait, and a timeout armed around each wait was ~11 % of the API's CPU with
        100 streams in flight (docs/performance.md). The timer fires when the current silence is
        due to be looked at and puts _LOOK in the queue; events that came since just move the
        next look later.
        """
        settings = self._settings
        deadline = Deadline(handle.job.deadline_unix_ms)
        give_up_at = time.monotonic() + deadline.remaining_s() + 2.0  # the worker's own 504 comes first
        pickup_by = time.monotonic() + settings.pickup_timeout_s
        quiet_since = time.monotonic()  # the last event, or the last look at the silence
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def look_at() -> float:
            # Before pickup: the pickup deadline; after: every liveness interval of silence.
            due = pickup_by if handle.worker_id is None else quiet_since + settings.worker_liveness_check_s
            return min(due, give_up_at)

        def rearm() -> None:
            nonlocal timer
            if timer is not None:
                timer.cancel()
            timer = loop.call_later(max(look_at() - time.monotonic(), 0), handle.queue.put_nowait, _LOOK)

        rearm()
        carried: Event | None = None  # an event taken off the queue while joining chunks, next in line
        try:
            while True:
                if carried is not None:
                    (event_type, payload), carried = carried, None
                else:
                    event_type, payload = await handle.queue.get()
                if event_type == "chunk" and handle.queue.qsize():
                    payload, carried = _join_waiting_chunks(payload, handle.queue)
                if event_type == _LOOK[0]:
                    now = time.monotonic()
                    if now < look_at():
                        rearm()  # events came meanwhile: the silence is younger than the timer thought
                        continue
                    if now >= give_up_at:
                        raise OpenAIError(504, "The request exceeded its deadline.", code="timeout")
                    if handle.worker_id is None:
                        if now >= pickup_by and await self._withdraw(handle):
                            raise no_workers()
                        pickup_by = max(pickup_by, time.monotonic() + settings.worker_liveness_check_s)
                    else:
                        try:
                            alive = await self._redis.exists(worker_heartbeat_key(handle.worker_id))
                        except (RedisError, OSError):
                            raise ReplyLost(handle.worker_id) from None
                        if not alive:
                            raise WorkerLost(handle.worker_id)
                    quiet_since = time.monotonic()
                    rearm()
                    continue
                quiet_since = time.monotonic()
                if event_type == "lost":
                    raise ReplyLost(handle.worker_id or "")
                if event_type == CALLER_LEFT[0]:
                    yield event_type, payload
                    return
                note_event(event_type, payload)
                if event_type == "accepted":
                    handle.worker_id = AcceptedEvent.model_validate_json(payload).worker_id
                    rearm()  # from the pickup deadline to the (shorter) liveness interval
                    continue
                if event_type in ("done", "error"):
                    handle.finished = True
                yield event_type, payload
                if handle.finished:
                    return
        finally:
            if timer is not None:
                timer.cancel()

    async def _withdraw(self, handle: JobHandle) -> bool:
        """Take a job that nobody started off the queue; False if a worker got it meanwhile.

        Workers claim with SET NX on arq's in-progress key (workers/main.py), so taking that key
        first is what makes the withdrawal and a claim mutually exclusive.
        """
        job_id = handle.job.job_id
        queue = self._settings.queue_name
        withdrawn = await self._withdraw_script(
            keys=[in_progress_key_prefix + job_id, queue, job_key_prefix + job_id, ready_list_key(queue)],
            args=[job_id, ready_entry(job_id, handle.payload)])
        if withdrawn:
            handle.finished = True
        return bool(withdrawn)

    async def release(self, handle: JobHandle) -> None:
        """Forget the job; if it is still running (client left), tell its worker to stop."""
        self._hub.unregister(handle.job.job_id)
        if handle.finished:
            return
        try:
            await self._stop_job(handle)
        except (RedisError, OSError) as exc:
            # Redis is down: the worker's own publishes fail too, which ends the job there.
            log.warning("could not cancel job %s (%s)", handle.job.job_id, type(exc).__name__, extra=STORE_DOWN)

    async def _stop_job(self, handle: JobHandle) -> None:
        if handle.worker_id is not None:
            await self._redis.publish(control_channel(handle.worker_id), cancel_message(handle.job.job_id))
            return
        if not await self._withdraw(handle):
            # Picked up but the accepted event has not arrived: leave a flag the worker checks.
            await self._redis.set(cancelled_job_key(handle.job.job_id), b"1", ex=60)
