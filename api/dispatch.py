"""Enqueue a chat job and follow it: pickup deadline, worker liveness, cancellation."""

import asyncio
import logging
import time
from dataclasses import dataclass

import orjson
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.errors import OpenAIError
from api.metrics import note_event, note_submitted
from api.relay import CALLER_LEFT, LOST, Deadline, Event, Replies, ReplyHub
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


# Put into a job's replies by its silence timer (JobReplies): a silence is due to be looked at.
_LOOK: Event = ("look", b"")
# Handed out by JobReplies.take when a stream that asked for keepalives has been quiet long enough.
QUIET: Event = ("quiet", b"")


class WorkerLost(Exception):
    """The worker running a job stopped heart-beating before the job finished."""


class ReplyLost(WorkerLost):
    """The reply subscription dropped (Redis restart): this job's events may be lost."""


def lost_error(lost: WorkerLost) -> OpenAIError:
    """The error for a job whose events stopped: its worker died, or Redis (the reply path) went away."""
    if isinstance(lost, ReplyLost):
        # Nothing is wrong with the request or upstream: the gateway's store blinked. Retryable.
        return OpenAIError(503, "The gateway lost its connection to its data store while answering; please retry.",
                           code="service_unavailable", headers={"Retry-After": "2"})
    return OpenAIError(502, "The worker handling this request stopped; please retry.", code="worker_lost",
                       headers={"Retry-After": "1"})


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
    replies: Replies
    payload: bytes = b""  # as queued (Dispatcher.serialize): names its ready-list entry until a worker takes it
    worker_id: str | None = None
    finished: bool = False


class Dispatcher:
    """Puts jobs on the arq queue and follows their reply events."""

    def __init__(self, redis: Redis, hub: ReplyHub, settings: Settings) -> None:
        self._redis = redis
        self._hub = hub
        self._settings = settings
        self._withdraw_script = redis.register_script(_WITHDRAW_LUA)
        self._alive_at: dict[str, float] = {}  # worker id → when its heartbeat was last seen (monotonic)
        self._checks: dict[str, asyncio.Future[bool]] = {}  # worker id → its heartbeat check in flight

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
        return JobHandle(job=job, replies=self._hub.register(job.job_id), payload=payload)

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

    def follow(self, handle: JobHandle) -> "JobReplies":
        """The job's reply events, with its silences watched; close() it when done with it."""
        return JobReplies(handle, self, self._settings)

    async def worker_alive(self, worker_id: str) -> bool:
        """Whether a worker still heart-beats; ReplyLost when Redis cannot tell.

        A worker that falls behind leaves all its streams silent at once, and each would check
        the same heartbeat (1,000 EXISTS a second for 1,000 streams): the checks of one worker
        share the one in flight, and a heartbeat seen within half a liveness interval answers.
        """
        seen = self._alive_at.get(worker_id)
        if seen is not None and time.monotonic() - seen < self._settings.worker_liveness_check_s / 2:
            return True
        check = self._checks.get(worker_id)
        if check is None:
            check = self._checks[worker_id] = asyncio.ensure_future(self._heartbeat_exists(worker_id))
            check.add_done_callback(lambda done: self._check_done(worker_id, done))
        return await asyncio.shield(check)  # one waiter cancelled does not cancel the others' check

    async def _heartbeat_exists(self, worker_id: str) -> bool:
        now = time.monotonic()
        try:
            alive = bool(await self._redis.exists(worker_heartbeat_key(worker_id)))
        except (RedisError, OSError):
            raise ReplyLost(worker_id) from None
        if alive:
            if len(self._alive_at) > 256:  # workers come and go (each start has a new id)
                self._alive_at = {w: at for w, at in self._alive_at.items() if now - at < 60}
            self._alive_at[worker_id] = now
        else:
            self._alive_at.pop(worker_id, None)
        return alive

    def _check_done(self, worker_id: str, check: "asyncio.Future[bool]") -> None:
        self._checks.pop(worker_id, None)
        if not check.cancelled():
            check.exception()  # retrieved here too: every waiter may have been cancelled

    async def withdraw(self, handle: JobHandle) -> bool:
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
        if not await self.withdraw(handle):
            # Picked up but the accepted event has not arrived: leave a flag the worker checks.
            await self._redis.set(cancelled_job_key(handle.job.job_id), b"1", ex=60)


class JobReplies:
    """A job's reply events, taken in batches in arrival order; raises 503 / WorkerLost / 504 as its fate says.

    Before a worker takes the job, silence past the pickup timeout withdraws it (503 no_workers)
    unless a worker holds it; after, every liveness interval of silence checks the worker's
    heartbeat (WorkerLost when it is gone); past the deadline (+2 s of grace) the answer is 504.
    Silences are watched by one timer per job, not one per wait: a paced stream's replies are
    empty at every wait, and a timeout armed around each wait was ~11 % of the API's CPU with 100
    streams in flight (docs/performance.md). The timer fires when the current silence is due to
    be looked at; if events came meanwhile it only re-arms itself, so a streaming job's reader is
    woken by its events alone.
    """

    def __init__(self, handle: JobHandle, dispatcher: Dispatcher, settings: Settings) -> None:
        self._handle = handle
        self._dispatcher = dispatcher
        self._liveness_s = settings.worker_liveness_check_s
        now = time.monotonic()
        self._give_up_at = now + Deadline(handle.job.deadline_unix_ms).remaining_s() + 2.0  # the worker's 504 first
        self._pickup_by = now + settings.pickup_timeout_s
        self._quiet_since = now  # the last event, or the last look at the silence
        self._keepalive_s: float | None = None
        self._pinged_at = now  # the last event handed out, or the last QUIET
        self._carried: list[Event] = []  # taken from the replies, to be handed out next (after a LOST)
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    def keep_alive(self, every_s: float | None) -> None:
        """From now on, hand out QUIET whenever nothing was handed out for `every_s` (None: never)."""
        self._keepalive_s = every_s
        self._pinged_at = time.monotonic()
        self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _look_at(self) -> float:
        due = self._pickup_by if self._handle.worker_id is None else self._quiet_since + self._liveness_s
        if self._keepalive_s is not None:
            due = min(due, self._pinged_at + self._keepalive_s)
        return min(due, self._give_up_at)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(max(self._look_at() - time.monotonic(), 0), self._due)

    def _due(self) -> None:
        if time.monotonic() < self._look_at():
            self._arm()  # events came meanwhile: the silence is younger than the timer thought
        else:
            self._timer = None
            self._handle.replies.put(_LOOK)

    async def take(self) -> list[Event]:
        """The events since the last take (at least one), in order: start, chunk, done, error, CALLER_LEFT, QUIET.

        Nothing is handed out after a done, an error or CALLER_LEFT.
        """
        handle = self._handle
        while True:
            batch, self._carried = self._carried or await handle.replies.take(), []
            out: list[Event] = []
            came = looked = rearm = False
            for i, event in enumerate(batch):
                event_type = event[0]
                if event_type == "chunk":
                    out.append(event)
                    continue
                if event_type == _LOOK[0]:
                    looked = True
                    continue
                came = True
                if event_type == LOST[0]:
                    if out:  # what came before the loss goes out first
                        self._carried = batch[i:]
                        break
                    raise ReplyLost(handle.worker_id or "")
                if event_type == CALLER_LEFT[0]:
                    out.append(event)
                    break
                note_event(event_type, event[1])
                if event_type == "accepted":
                    handle.worker_id = AcceptedEvent.model_validate_json(event[1]).worker_id
                    handle.payload = b""  # only a withdrawal needs it, and a job a worker took is not withdrawn
                    rearm = True  # from the pickup deadline to the (shorter) liveness interval
                    continue
                out.append(event)
                if event_type in ("done", "error"):
                    handle.finished = True
                    break
            now = time.monotonic()
            if out or came:
                self._quiet_since = now
            if out:
                self._pinged_at = now
                if looked or rearm:
                    self._arm()
                return out
            if looked:
                if await self._look(now):
                    return [QUIET]
            elif rearm:
                self._arm()

    async def _look(self, now: float) -> bool:
        """Look at a silence the timer found due; True when a keepalive is due."""
        handle = self._handle
        if now >= self._give_up_at:
            raise OpenAIError(504, "The request exceeded its deadline.", code="timeout")
        if handle.worker_id is None:
            if now >= self._pickup_by:
                if await self._dispatcher.withdraw(handle):
                    raise no_workers()
                # A worker holds the job but its accepted event is late: look again after a while.
                self._pickup_by = max(self._pickup_by, time.monotonic() + self._liveness_s)
                self._quiet_since = time.monotonic()
        elif now >= self._quiet_since + self._liveness_s:
            if not await self._dispatcher.worker_alive(handle.worker_id):
                raise WorkerLost(handle.worker_id)
            self._quiet_since = time.monotonic()
        quiet = self._keepalive_s is not None and now >= self._pinged_at + self._keepalive_s
        if quiet:
            self._pinged_at = now
        self._arm()
        return quiet
