"""The arq worker: a Worker subclass that is woken by pub/sub instead of polling, plus start-up."""

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Coroutine
from typing import Any, cast

import httpx
import orjson
from arq import func
from arq.connections import RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import SerializationError, deserialize_job_raw
from arq.utils import ms_to_datetime, timestamp_ms
from arq.worker import Worker
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.catalog import RuntimeCatalog
from router.providers.transport import upstream_client
from settings import Settings, get_settings
from settings.catalog import load_catalog
from settings.logfields import STORE_DOWN
from settings.redis_url import sentinel_target
from workers.batches import run_batches
from workers.capacity import CapacityMeter
from workers.claim import Claimer, JobClaim
from workers.events import EventPublisher
from workers.heartbeat import HeartbeatThread
from workers.jobs import JobCleanup, WorkerState, chat_completion, report_unrunnable
from workers.protocol import (
    ARQ_JOB_FUNCTION,
    POOL_LOAD_KEY,
    WAKE_CHANNEL,
    WORKERS_KEY,
    control_channel,
    ready_list_key,
    split_ready_entry,
    worker_heartbeat_key,
)
from workers.routing import build_executor, start_refresher, stop_refresher

log = logging.getLogger("freeference.worker")

# Catalogs up to this many deployments have all their health read with every claim; larger
# ones read their candidates when a job routes.
_CLAIM_HEALTH_MAX_DEPLOYMENTS = 64

# Jobs the slow scan of arq's queue may claim are at least this old: younger ones are the
# ready list's (a pop is on its way to a worker), and claiming them here too would only make
# the popping worker's claim fail.
_SCAN_GRACE_MS = 1_000
# How long one blocking pop of the ready list waits before it looks at the worker's state again.
_POP_WAIT_S = 1
# The most jobs one pop takes (and one claim covers) when a burst waits on the ready list.
_POP_BATCH_MAX = 32
# Two pickup tasks, so a pop is always waiting while the other one's jobs start; each writes its
# next pop this long after its last one returned (a job's routing takes about that long).
_PICKUP_TASKS = 2
_POP_REISSUE_DELAY_S = 0.003
# While full, how often a pickup task looks at the age of the oldest job waiting on the ready list.
_PROMISED_LOOK_S = 0.25

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


class FreeferenceWorker(Worker):
    """arq's Worker, handed each job the moment it is enqueued.

    Stock arq sleeps `poll_delay` between queue scans, which puts up to that delay on every
    request, and every worker scans for every job. Here the API also pushes each job, payload
    and all, onto a ready list that idle workers block on (BLMPOP): one worker gets it at once,
    claims it on arq's in-progress key while it already parses and classifies it, and runs it.
    The slow scan of arq's queue remains as the safety net for a pop that was lost. A pub/sub
    listener receives cancellations for running jobs (and the wake-ups of earlier API releases),
    and a heartbeat key tells the API that this worker is alive. Redis outages are waited out
    instead of ending the process (arq exits on a connection error).
    """

    def __init__(self, *args: Any, settings: Settings, worker_id: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.worker_id = worker_id
        self._wake = asyncio.Event()
        # Job ids named by wake messages since the last claim (APIs of earlier releases).
        self._woken_ids: list[bytes] = []
        self._scan_requested = True
        self._claimer: Claimer | None = None
        self._popping = 0  # pickup tasks holding a slot for a pop in flight
        self._background: list[asyncio.Task[None]] = []
        self._bookkeeping: set[asyncio.Task[None]] = set()
        # What this worker can still take on, measured; max_jobs is only the safety ceiling.
        self.capacity = CapacityMeter(settings, lambda: self.job_counter)
        self._promised_after_ms = settings.pickup_timeout_s * 500  # half the pickup deadline
        self._beats: HeartbeatThread | None = None
        self.ctx["capacity"] = self.capacity

    @property
    def claimer(self) -> Claimer:
        if self._claimer is None:
            state: WorkerState = self.ctx["state"]
            deployments = state.catalog.deployments
            self._claimer = Claimer(self.pool, self.queue_name, self.worker_id, int(self.in_progress_timeout_s * 1000),
                                    deployments if len(deployments) <= _CLAIM_HEALTH_MAX_DEPLOYMENTS else [])
        return self._claimer

    async def main(self) -> None:
        # Same start-up as arq's Worker.main; the loop below replaces its fixed-delay poll.
        if self._pool is None:
            self._pool = await create_pool(self.redis_settings, job_deserializer=self.job_deserializer,
                                           job_serializer=self.job_serializer, default_queue_name=self.queue_name,
                                           expires_extra_ms=self.expires_extra_ms)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        self._background = [*(asyncio.create_task(self._pickup(), name=f"pickup-{n}") for n in range(_PICKUP_TASKS)),
                            asyncio.create_task(self._listen(), name="wake-listener"),
                            asyncio.create_task(self._heartbeat(), name="heartbeat"),
                            asyncio.create_task(self.capacity.watch(), name="capacity"),
                            asyncio.create_task(self._publish_load(), name="load-record"),
                            asyncio.create_task(self._watch_callers(), name="caller-watch")]
        # Batch lines are leased from Redis by this task, never queued in arq (docs/batches.md).
        self._background.append(asyncio.create_task(
            run_batches(self.pool, self.ctx["state"], lambda: self.allow_pick_jobs), name="batches"))
        log.info("worker %s ready (max_jobs=%d)", self.worker_id, self.max_jobs)
        backoff_s = 0.05
        last_scan = 0.0
        while True:
            self._wake.clear()
            woken, self._woken_ids = self._woken_ids, []
            try:
                # A wake names its job, so claim it directly (one script call) instead of
                # scanning the queue first. A full arq poll iteration (scan, task reaping, arq's
                # health beat) still runs on id-less wakes and at least every poll_delay.
                due = time.monotonic() - last_scan >= self.poll_delay_s
                if woken and self.allow_pick_jobs and not (due or self._scan_requested):
                    await self.start_jobs(woken, due_by_ms=timestamp_ms())
                else:
                    self._scan_requested = False
                    last_scan = time.monotonic()
                    await self._poll_iteration()
                backoff_s = 0.05
            except _REDIS_DOWN as exc:
                log.warning("redis unavailable (%s); retrying", type(exc).__name__, extra=STORE_DOWN)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
                continue
            # asyncio.timeout, not wait_for: wait_for wraps the wait in a task of its own, an
            # allocation and an extra loop pass between every wake-up and its claim.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_delay_s):
                    await self._wake.wait()

    async def _pickup(self) -> None:
        """Pop new jobs off the ready list, as many as there are free slots, and start them.

        The pop hands each job to exactly one worker and brings its payload, so a job starts
        without another round trip; the claim of everything one pop took (workers/claim.py) is
        sent at once, and each job waits for it only before it ranks its candidates. A burst is
        taken in pops of up to _POP_BATCH_MAX jobs (BLMPOP, Redis 7) with one claim for each
        pop. A pop lost on the way (a connection cut, this worker stopped) leaves its jobs on
        arq's queue, where a scan finds them after _SCAN_GRACE_MS.
        """
        ready = ready_list_key(self.queue_name)
        backoff_s = 0.05
        while True:
            if not self.allow_pick_jobs:  # draining for a SIGTERM
                await asyncio.sleep(self.poll_delay_s)
                continue
            # Room by measured capacity first: while this worker is full or its loop is late,
            # jobs wait on the ready list (for another worker, or for this one to catch up),
            # unless they have waited so long that the API's promise is at stake.
            promised = await room_or_promised(self.capacity, self.pool, ready, self._promised_after_ms)
            await self.sem.acquire()  # a free slot first: a popped job never waits for one
            held = 1
            self._popping += 1
            try:
                # The free slots, less those the other pickup task holds for its own pop.
                room = min(max(self.max_jobs - self.job_counter - (self._popping - 1), 1), _POP_BATCH_MAX,
                           _POP_BATCH_MAX if promised else max(self.capacity.room(), 1))
                # [list name, [entries]] or None. redis-py types each key as a list: it is a name.
                try:
                    popped = await cast(Awaitable[list[Any] | None], self.pool.blmpop(
                        _POP_WAIT_S, 1, ready, direction="LEFT", count=room))  # type: ignore[arg-type]
                finally:
                    self._popping -= 1
                backoff_s = 0.05
                if popped is not None:
                    held = await self._start_popped(popped[1])
                    # The other pickup task is already waiting for the next job: this one writes
                    # its next pop once the jobs it started are on their way upstream, not in
                    # the middle of the work before their first upstream byte.
                    await asyncio.sleep(_POP_REISSUE_DELAY_S)
            except _REDIS_DOWN as exc:
                log.warning("ready list unavailable (%s); retrying", type(exc).__name__, extra=STORE_DOWN)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
            except RedisError as exc:  # e.g. a server without BLMPOP (Redis < 7): the scan still finds every job
                log.error("ready list pop refused (%s); retrying in %.2fs", type(exc).__name__, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
            finally:
                for _ in range(held):
                    self.sem.release()

    async def _start_popped(self, entries: list[bytes]) -> int:
        """Start popped jobs, the first in the slot the pop holds; returns the slots left unused (0 or 1)."""
        if not self.allow_pick_jobs:
            # The drain began while this pop was blocked: leave the jobs to other workers.
            self._in_background(self._give_back(entries))
            return 1
        jobs = dict(split_ready_entry(entry) for entry in entries)
        for job_id in [j for j in jobs if j in self.tasks]:
            del jobs[job_id]  # the scan gave it to this worker already: a late entry of a job running here
        if not jobs:
            return 1
        claims = self.loop.create_task(self.claimer.claim_popped(list(jobs)))
        for n, (job_id, payload) in enumerate(jobs.items()):
            if n > 0:
                await self.sem.acquire()  # free by the count the pop asked for, unless the scan took it
            self.job_counter += 1
            self._start(job_id, payload, _claim_of(claims, job_id))
        return 0

    async def _give_back(self, entries: list[bytes]) -> None:
        with contextlib.suppress(*_REDIS_DOWN):  # else the scan finds them
            await cast(Awaitable[int], self.pool.lpush(ready_list_key(self.queue_name), *reversed(entries)))

    async def start_jobs(self, job_ids: list[bytes], due_by_ms: int | None = None) -> None:
        """Claim every startable job of this scan (or of these wake-ups) in one Lua call, then run them.

        arq claims job by job (WATCH, EXISTS, ZSCORE, MULTI/EXEC: four round trips each, in
        sequence), which caps pickup at a few hundred jobs a second and made the queue wait grow
        to seconds under a burst (bench/soak.py); then each job reads its payload and bumps its
        try counter (another round trip) before it starts. The script does all of that for all of
        them in one round trip, with the same in-progress key arq uses (so arq's job status and
        the API's withdrawal still apply). arq's scan passes no `due_by_ms`: it takes only jobs
        older than _SCAN_GRACE_MS, the ready list's pops being on their way with the younger ones.
        """
        free = min(self.max_jobs - self.job_counter, self.capacity.room())
        if free <= 0 or not job_ids:
            return
        due_by_ms = timestamp_ms() - _SCAN_GRACE_MS if due_by_ms is None else due_by_ms
        for claim in await self.claimer.claim(job_ids[:free], due_by_ms=due_by_ms):
            if not claim.runnable or claim.payload is None:
                # Expired (its caller gave up long ago) or its caller left before pickup.
                self._in_background(self._forget_job(claim.job_id))
                continue
            await self.sem.acquire()
            self.job_counter += 1
            settled: asyncio.Future[JobClaim] = self.loop.create_future()
            settled.set_result(claim)
            self._start(claim.job_id, claim.payload, settled)

    def _start(self, job_id: str, payload: bytes, claim: "asyncio.Future[JobClaim]") -> None:
        """Run a job in a slot already counted (sem and job_counter), freeing it when done."""
        task = self.loop.create_task(self._run_job(job_id, payload, claim))
        task.add_done_callback(self._job_ended)
        self.tasks[job_id] = task
        self.capacity.note_started()

    def _job_ended(self, _: "asyncio.Task[None]") -> None:
        self._release_sem_dec_counter_on_complete()
        self.capacity.note_finished()

    async def _run_job(self, job_id: str, payload: bytes, claim: "asyncio.Future[JobClaim]") -> None:
        """arq's run_job for a chat job whose payload is in hand: run it, then clean up.

        Interactive jobs run once (max_tries=1, no retry: a second run would repeat tokens the
        caller has) and keep no result (every outcome went to the caller as an event), so what
        remains of arq's bookkeeping is the timeout, the counters and deleting the job's keys.
        The job itself waits for `claim` before it calls upstream (workers/jobs.py).
        """
        try:
            name, args, kwargs, _, enqueue_ms = deserialize_job_raw(payload, deserializer=self.job_deserializer)
            function = self.functions[name]
        except (SerializationError, KeyError):
            log.error("job %s cannot run: unreadable payload or unknown function", job_id)
            self.jobs_failed += 1
            with contextlib.suppress(*_REDIS_DOWN):
                if (await claim).announced:  # its caller knows a worker has it: tell it now, not at the deadline
                    await report_unrunnable(self.ctx["state"], job_id)
            await asyncio.shield(self._forget_claimed(job_id, claim))
            return
        cleanup = JobCleanup([("DEL", *_job_keys(job_id))])
        ctx = {**self.ctx, "job_id": job_id, "job_try": 1, "enqueue_time": ms_to_datetime(enqueue_ms),
               "claim": claim, "cleanup": cleanup}
        self.job_tasks[job_id] = task = self.loop.create_task(function.coroutine(ctx, *args, **kwargs))
        timeout_s = self.job_timeout_s if function.timeout_s is None else function.timeout_s
        try:
            await asyncio.wait_for(task, timeout_s)
            self.jobs_complete += 1
        except asyncio.CancelledError:
            # The worker is shutting down past its drain time. Not re-raised, as arq's run_job
            # does not: Worker.close() gathers these tasks and would stop before on_shutdown.
            log.warning("job %s cancelled at shutdown", job_id)
            self.jobs_failed += 1
        except Exception:  # the job function never raises for a request's own failures
            log.exception("job %s failed", job_id)
            self.jobs_failed += 1
        finally:
            self.job_tasks.pop(job_id, None)
            if not cleanup.sent:  # else its keys went with its last event
                await asyncio.shield(self._forget_claimed(job_id, claim))

    async def _forget_claimed(self, job_id: str, claim: "asyncio.Future[JobClaim]") -> None:
        """_forget_job, if this worker's claim took the job: another owner's keys are not ours to delete."""
        try:
            # Done unless the job ended before it needed its claim (an unreadable job): the claim
            # may have taken it even so, and then its keys are ours to delete.
            won = (await claim).claimed
        except (asyncio.CancelledError, RedisError, OSError):
            return  # unknown: the keys expire on their own
        if won:
            await self._forget_job(job_id)

    async def _forget_job(self, job_id: str) -> None:
        """Delete a finished job's keys (arq's finish_job with no result kept)."""
        with contextlib.suppress(*_REDIS_DOWN):  # the keys expire on their own
            await self.pool.delete(*_job_keys(job_id))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(work)
        self._bookkeeping.add(task)  # a reference, so the task is not garbage-collected mid-flight
        task.add_done_callback(self._bookkeeping.discard)

    async def _listen(self) -> None:
        control = control_channel(self.worker_id)
        backoff_s = 0.05
        while True:
            pubsub = self.pool.pubsub()
            try:
                await pubsub.subscribe(WAKE_CHANNEL, control)
                backoff_s = 0.05
                self._scan_requested = True  # anything enqueued while we were not listening
                self._wake.set()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is None:
                        continue
                    if message["channel"] == control.encode():
                        self._handle_control(message["data"])
                    else:
                        self._woken_ids.append(message["data"])
                        self._wake.set()
            except _REDIS_DOWN:
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
            except RedisError as exc:  # e.g. NOPERM: keep listening rather than fall back to polling
                log.error("wake listener error (%s); resubscribing", type(exc).__name__)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _handle_control(self, data: bytes) -> None:
        verb, _, job_id = data.decode(errors="replace").partition(" ")
        state: WorkerState = self.ctx["state"]
        task = state.running.get(job_id)
        if verb == "cancel" and task is not None:
            task.cancel()

    async def _heartbeat(self) -> None:
        # The key is written by a thread (workers/heartbeat.py), so that a loop running seconds
        # late on a crowded machine does not make its streams look lost; the loop only says here
        # that it still runs, and the thread stops renewing the key when it no longer does.
        self._beats = HeartbeatThread(self.settings.effective_redis_url, worker_heartbeat_key(self.worker_id),
                                      WORKERS_KEY, self.worker_id, every_s=self.settings.worker_heartbeat_s,
                                      ttl_s=self.settings.worker_heartbeat_ttl_s, info=self._heartbeat_info)
        self._beats.start()
        while True:
            self._beats.loop_alive()
            await asyncio.sleep(self.settings.worker_heartbeat_s)

    def _heartbeat_info(self) -> bytes:
        # Read from the heartbeat thread: len() of a dict and an attribute read are atomic.
        state: WorkerState = self.ctx["state"]
        # `deployments`: what this worker can route at all (0: no provider enabled), for /readyz.
        return orjson.dumps({"host": socket.gethostname(), "pid": os.getpid(), "running": len(state.running),
                             "deployments": len(state.catalog.deployments)})

    async def _publish_load(self) -> None:
        # The API reads every worker's record in one HGETALL to tell whether the pool can take
        # a job soon (api/pool_load.py); each record says how long it is good for.
        every_s = self.settings.worker_load_publish_s
        while True:
            record = self.capacity.record(ttl_s=every_s * 3).model_dump_json()
            with contextlib.suppress(*_REDIS_DOWN):  # the heartbeat logs outages
                await cast(Awaitable[int], self.pool.hset(POOL_LOAD_KEY, self.worker_id, record))
            await asyncio.sleep(every_s)

    async def _watch_callers(self) -> None:
        # A job learns that its API process died when a PUBLISH reaches nobody, but a job that
        # publishes nothing for a while (non-streaming, or waiting on a slow first token) would
        # keep its upstream call running. One PUBSUB NUMSUB for all reply channels catches those.
        while True:
            await asyncio.sleep(self.settings.worker_caller_check_s)
            state: WorkerState = self.ctx["state"]
            channels = sorted(set(state.callers.values()))
            if not channels:
                continue
            try:
                counts = {name.decode() if isinstance(name, bytes) else name: n
                          for name, n in await self.pool.pubsub_numsub(*channels)}
            except _REDIS_DOWN:
                continue  # the jobs' own publishes fail too, which ends them
            for job_id, channel in list(state.callers.items()):
                task = state.running.get(job_id)
                if counts.get(channel) == 0 and task is not None:
                    log.info("job %s stopped: nobody listens on its reply channel", job_id)
                    task.cancel()

    async def close(self) -> None:
        """arq's close, except that the last writes may fail.

        With Redis gone (restarting, or a store stopped before the worker) arq's close raised at
        its first write, skipped on_shutdown (the event publisher, the HTTP clients) and ended
        the process with a traceback. Here the jobs are awaited and the clients closed anyway.
        """
        for task in self._background:
            task.cancel()
        if self._pool is None:
            return
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        await asyncio.gather(*self.tasks.values())
        if self._beats is not None:
            # Stopped before the key is deleted, so that no late beat brings it back.
            await asyncio.to_thread(self._beats.stop)
        try:
            await self.pool.delete(worker_heartbeat_key(self.worker_id), self.health_check_key)
            await self.pool.zrem(WORKERS_KEY, self.worker_id)
            await cast(Awaitable[int], self.pool.hdel(POOL_LOAD_KEY, self.worker_id))
        except _REDIS_DOWN as exc:
            log.warning("redis unavailable while stopping (%s); the heartbeat expires by itself", type(exc).__name__,
                        extra=STORE_DOWN)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        with contextlib.suppress(*_REDIS_DOWN):
            await self.pool.close(close_connection_pool=True)
        self._pool = None


def _job_keys(job_id: str) -> tuple[str, str, str]:
    """arq's keys of one job (in progress, payload, tries), deleted when it ends: we keep no result."""
    return in_progress_key_prefix + job_id, job_key_prefix + job_id, retry_key_prefix + job_id


def _claim_of(claims: "asyncio.Task[dict[str, JobClaim]]", job_id: str) -> "asyncio.Future[JobClaim]":
    """One job's share of a claim that covered several popped jobs."""
    mine: asyncio.Future[JobClaim] = asyncio.get_running_loop().create_future()

    def settle(done: "asyncio.Task[dict[str, JobClaim]]") -> None:
        if mine.done():
            return
        if done.cancelled():
            mine.cancel()
        elif (error := done.exception()) is not None:
            mine.set_exception(error)
        else:
            mine.set_result(done.result()[job_id])

    claims.add_done_callback(settle)
    return mine


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    # arq logs every job's arguments and httpx every request line: prompts and upstream URLs
    # stay out of the logs.
    logging.getLogger("arq.worker").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    catalog = RuntimeCatalog.build(load_catalog(settings.catalog))
    catalog.log_summary()
    # No pool limit: a bounded pool made a worker's own wait for a connection look like the
    # provider's connect timeout (router/providers/slots.py bounds providers that need it).
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None, keepalive_expiry=30)
    client = upstream_client(limits)
    ctx["http"] = client
    events = EventPublisher(ctx["redis"].connection_pool)
    events.start()
    ctx["state"] = WorkerState(
        worker_id=ctx["worker_id"], settings=settings, catalog=catalog,
        executor=build_executor(ctx["redis"], client, settings, sink=events, local=ctx["capacity"]), events=events,
    )
    ctx["refresher"] = start_refresher(ctx["redis"], catalog, client, settings)


async def _shutdown(ctx: dict[str, Any]) -> None:
    await stop_refresher(ctx.get("refresher"))
    state: WorkerState | None = ctx.get("state")
    if state is not None:
        await state.executor.settle()  # health writes still in flight, before Redis closes
        await state.events.close()
    client: httpx.AsyncClient | None = ctx.get("http")
    if client is not None:
        await client.aclose()


def ready_entry_enqueued_ms(entry: bytes) -> int | None:
    """When a ready-list entry's job was enqueued (arq's reading of its payload); None if unreadable."""
    try:
        return deserialize_job_raw(split_ready_entry(entry)[1], deserializer=orjson.loads)[4]
    except SerializationError:
        return None


async def room_or_promised(capacity: CapacityMeter, redis: Redis, ready: str, promised_after_ms: float) -> bool:
    """Wait for room by measured capacity (False), or for a job that has waited `promised_after_ms` (True).

    The API admitted every job on the ready list by the room the pool last published
    (api/pool_load.py). A burst admitted within one reading of that room can turn out to be more
    than the workers then measure they can carry, or their loops run late for seconds on a
    crowded machine: left to wait for room, those jobs were answered 503 `no_workers` at their
    pickup deadline, after the caller had waited for it. An admitted job is served: one that has
    waited half its pickup deadline is taken past the measured capacity (the job cap and the
    memory limit still hold), a slower stream rather than a late refusal.
    """
    while True:
        try:
            await asyncio.wait_for(capacity.wait_for_room(), _PROMISED_LOOK_S)
            return False
        except TimeoutError:
            pass
        if capacity.memory_full():
            continue
        try:
            head = await cast(Awaitable[bytes | None], redis.lindex(ready, 0))
        except _REDIS_DOWN:
            continue  # the pop reports the outage once there is room
        enqueued_ms = ready_entry_enqueued_ms(head) if head else None
        if enqueued_ms is not None and time.time() * 1000 - enqueued_ms >= promised_after_ms:
            return True


def arq_redis_settings(url: str) -> RedisSettings:
    """arq's connection settings for a plain or a redis+sentinel:// URL."""
    target = sentinel_target(url)
    if target is None:
        return RedisSettings.from_dsn(url)
    return RedisSettings(host=target.sentinels, sentinel=True, sentinel_master=target.service, database=target.db,
                         username=target.username, password=target.password)


def build_worker(settings: Settings | None = None) -> FreeferenceWorker:
    """A worker configured from settings (one per process)."""
    settings = settings or get_settings()
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    chat = func(chat_completion, name=ARQ_JOB_FUNCTION, max_tries=1, keep_result=0,
                timeout=settings.request_timeout_s + 30)
    return FreeferenceWorker(
        functions=[chat],
        settings=settings,
        worker_id=worker_id,
        queue_name=settings.queue_name,
        redis_settings=arq_redis_settings(settings.effective_redis_url),
        max_jobs=settings.worker_max_jobs,
        poll_delay=settings.worker_fallback_poll_s,
        keep_result=0,
        # Interactive jobs are never re-run: a second run would repeat tokens the caller has.
        retry_jobs=False,
        health_check_interval=10,
        job_completion_wait=int(settings.worker_drain_s),
        job_serializer=orjson.dumps,
        job_deserializer=orjson.loads,
        on_startup=_startup,
        on_shutdown=_shutdown,
        ctx={"settings": settings, "worker_id": worker_id},
        log_results=False,
    )


def run_worker(settings: Settings | None = None) -> None:
    """Run one worker process until SIGTERM/SIGINT (which drain in-flight jobs first)."""
    build_worker(settings).run()
