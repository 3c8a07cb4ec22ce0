"""The arq worker: a Worker subclass that is woken by pub/sub instead of polling, plus start-up."""

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Coroutine
from typing import Any

import httpx
import orjson
from arq import func
from arq.connections import RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.jobs import SerializationError, deserialize_job_raw
from arq.utils import ms_to_datetime, timestamp_ms
from arq.worker import Worker
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.catalog import RuntimeCatalog
from router.health import HealthSnapshot, now_ms, snapshot_from, snapshot_keys
from router.providers.transport import upstream_client
from settings import Settings, get_settings
from settings.catalog import load_catalog
from settings.redis_url import sentinel_target
from workers.batches import run_batches
from workers.events import EventPublisher
from workers.jobs import WorkerState, chat_completion, report_unrunnable
from workers.protocol import (
    ARQ_JOB_FUNCTION,
    WAKE_CHANNEL,
    WORKERS_KEY,
    accepted_payload,
    cancelled_job_key,
    control_channel,
    reply_channel,
    worker_heartbeat_key,
)
from workers.routing import build_executor, start_refresher, stop_refresher

log = logging.getLogger("freeference.worker")

# Claim and announce jobs in one call. KEYS[1] the queue, then the shared-health hashes of every
# deployment (router.health.snapshot_keys). ARGV: in-progress key prefix, now (ms), in-progress
# TTL (ms), job key prefix, cancelled-job key prefix, reply channel prefix, the accepted
# event's " accepted <payload>" tail, then job ids. For each job that is due and not in
# progress elsewhere: take it (SET NX, so two workers never both run it), take it off the
# queue, read its payload, and unless its caller already left, announce it on the reply channel
# its id names (`<process>.<uuid>`, workers/protocol.new_job_id). When it took any, it also
# reads the health hashes, which the jobs route by. Returns
# {{HGETALL reply per health key}, {id, score, payload or false, cancelled 0|1, announced 0|1, ...}}.
_CLAIM_LUA = """
local out = {}
for i = 8, #ARGV do
  local id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], id)
  if score and tonumber(score) <= tonumber(ARGV[2])
     and redis.call('SET', ARGV[1] .. id, '1', 'PX', ARGV[3], 'NX') then
    redis.call('ZREM', KEYS[1], id)
    local payload = redis.call('GET', ARGV[4] .. id)
    local cancelled = redis.call('EXISTS', ARGV[5] .. id)
    local announced = 0
    local process = string.match(id, '^(%w+)%.')
    if payload and cancelled == 0 and process then
      redis.call('PUBLISH', ARGV[6] .. process, id .. ARGV[7])
      announced = 1
    end
    out[#out + 1] = id
    out[#out + 1] = score
    out[#out + 1] = payload
    out[#out + 1] = cancelled
    out[#out + 1] = announced
  end
end
local health = {}
if #out > 0 then
  for i = 2, #KEYS do health[#health + 1] = redis.call('HGETALL', KEYS[i]) end
end
return {health, out}
"""

def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """An HGETALL reply as Lua returns it (a flat list) → the mapping redis-py would have made."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


# Catalogs up to this many deployments have all their health read with every claim; larger
# ones read their candidates when a job routes.
_CLAIM_HEALTH_MAX_DEPLOYMENTS = 64

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


class FreeferenceWorker(Worker):
    """arq's Worker, woken the moment a job is enqueued.

    Stock arq sleeps `poll_delay` between queue scans, which puts up to that delay on every
    request. Here a pub/sub listener sets an event on each message on the wake channel (the
    API publishes one per enqueue) and the main loop scans at once; the slow poll remains
    only as a safety net. The same listener receives cancellations for running jobs, and a
    heartbeat key tells the API that this worker is alive. Redis outages are waited out
    instead of ending the process (arq exits on a connection error).
    """

    def __init__(self, *args: Any, settings: Settings, worker_id: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.worker_id = worker_id
        self._wake = asyncio.Event()
        # Job ids named by wake messages since the last claim (each wake names its job).
        self._woken_ids: list[bytes] = []
        self._scan_requested = True
        self._claim: AsyncScript | None = None
        self._background: list[asyncio.Task[None]] = []
        self._bookkeeping: set[asyncio.Task[None]] = set()

    async def main(self) -> None:
        # Same start-up as arq's Worker.main; the loop below replaces its fixed-delay poll.
        if self._pool is None:
            self._pool = await create_pool(self.redis_settings, job_deserializer=self.job_deserializer,
                                           job_serializer=self.job_serializer, default_queue_name=self.queue_name,
                                           expires_extra_ms=self.expires_extra_ms)
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        self._background = [asyncio.create_task(self._listen(), name="wake-listener"),
                            asyncio.create_task(self._heartbeat(), name="heartbeat"),
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
                    await self.start_jobs(woken)
                else:
                    self._scan_requested = False
                    last_scan = time.monotonic()
                    await self._poll_iteration()
                backoff_s = 0.05
            except _REDIS_DOWN as exc:
                log.warning("redis unavailable (%s); retrying in %.2fs", type(exc).__name__, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
                continue
            # asyncio.timeout, not wait_for: wait_for wraps the wait in a task of its own, an
            # allocation and an extra loop pass between every wake-up and its claim.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_delay_s):
                    await self._wake.wait()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Claim every startable job of this poll in one Lua call, then run them.

        arq claims job by job (WATCH, EXISTS, ZSCORE, MULTI/EXEC: four round trips each, in
        sequence), which caps pickup at a few hundred jobs a second and made the queue wait grow
        to seconds under a burst (bench/soak.py); then each job reads its payload and bumps its
        try counter (another round trip) before it starts, and the chat job announced itself
        (one more). The script does all of that for all of them in one round trip, with the same
        in-progress key arq uses (so arq's job status and the API's withdrawal still apply).
        """
        free = self.max_jobs - self.job_counter
        if free <= 0 or not job_ids:
            return
        if self._claim is None:
            self._claim = self.pool.register_script(_CLAIM_LUA)
        state: WorkerState = self.ctx["state"]
        # The health of every deployment comes back with the claim (one round trip fewer before
        # the upstream call) unless the catalog is too large to read whole for every job.
        routable = state.catalog.deployments if len(state.catalog.deployments) <= _CLAIM_HEALTH_MAX_DEPLOYMENTS else []
        hashes, claimed = await self._claim(keys=[self.queue_name, *snapshot_keys(routable)], args=[
            in_progress_key_prefix, timestamp_ms(), int(self.in_progress_timeout_s * 1000), job_key_prefix,
            cancelled_job_key(""), reply_channel(""), b" accepted " + accepted_payload(self.worker_id),
            *job_ids[:free]])
        read_at_ms = now_ms()
        replies = [_pairs(h) for h in hashes]
        for i in range(0, len(claimed), 5):
            job_id_b, score, payload, cancelled, announced = claimed[i:i + 5]
            job_id = job_id_b.decode()
            if payload is None or cancelled:
                # Expired (its caller gave up long ago) or its caller left before pickup.
                self._in_background(self._forget_job(job_id))
                continue
            await self.sem.acquire()
            self.job_counter += 1
            # A snapshot per job: a job records what it learns (a refused key) in its own copy.
            health = snapshot_from(routable, replies, read_at_ms) if routable else None
            task = self.loop.create_task(self._run_claimed(job_id, int(float(score)), payload, bool(announced),
                                                           health))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def _run_claimed(self, job_id: str, score: int, payload: bytes, announced: bool,
                           health: HealthSnapshot | None) -> None:
        """arq's run_job for a job the claim script has already read: run it, then clean up.

        Interactive jobs run once (max_tries=1, no retry: a second run would repeat tokens the
        caller has) and keep no result (every outcome went to the caller as an event), so what
        remains of arq's bookkeeping is the timeout, the counters and deleting the job's keys.
        """
        try:
            name, args, kwargs, _, enqueue_ms = deserialize_job_raw(payload, deserializer=self.job_deserializer)
            function = self.functions[name]
        except (SerializationError, KeyError):
            log.error("job %s cannot run: unreadable payload or unknown function", job_id)
            self.jobs_failed += 1
            if announced:  # its caller knows a worker has it: tell it now, not at the deadline
                await report_unrunnable(self.ctx["state"], job_id)
            await asyncio.shield(self._forget_job(job_id))
            return
        ctx = {**self.ctx, "job_id": job_id, "job_try": 1, "enqueue_time": ms_to_datetime(enqueue_ms),
               "score": score, "announced": announced, "health": health}
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
            await asyncio.shield(self._forget_job(job_id))

    async def _forget_job(self, job_id: str) -> None:
        """Delete a finished job's keys (arq's finish_job with no result kept)."""
        with contextlib.suppress(*_REDIS_DOWN):  # the keys expire on their own
            await self.pool.delete(in_progress_key_prefix + job_id, job_key_prefix + job_id,
                                   retry_key_prefix + job_id)

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
        key = worker_heartbeat_key(self.worker_id)
        ttl_ms = int(self.settings.worker_heartbeat_ttl_s * 1000)
        while True:
            state: WorkerState = self.ctx["state"]
            info = orjson.dumps({"host": socket.gethostname(), "pid": os.getpid(), "running": len(state.running)})
            with contextlib.suppress(*_REDIS_DOWN):
                async with self.pool.pipeline(transaction=False) as pipe:
                    pipe.set(key, info, px=ttl_ms)
                    pipe.zadd(WORKERS_KEY, {self.worker_id: int(time.time() * 1000) + ttl_ms})
                    await pipe.execute()
            await asyncio.sleep(self.settings.worker_heartbeat_s)

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
        try:
            await self.pool.delete(worker_heartbeat_key(self.worker_id), self.health_check_key)
            await self.pool.zrem(WORKERS_KEY, self.worker_id)
        except _REDIS_DOWN as exc:
            log.warning("redis unavailable while stopping (%s); the heartbeat expires by itself", type(exc).__name__)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        with contextlib.suppress(*_REDIS_DOWN):
            await self.pool.close(close_connection_pool=True)
        self._pool = None


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    # arq logs every job's arguments and httpx every request line: prompts and upstream URLs
    # stay out of the logs.
    logging.getLogger("arq.worker").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    catalog = RuntimeCatalog.build(load_catalog(settings.catalog))
    catalog.log_summary()
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30)
    client = upstream_client(limits)
    ctx["http"] = client
    events = EventPublisher(ctx["redis"].connection_pool)
    events.start()
    ctx["state"] = WorkerState(
        worker_id=ctx["worker_id"], settings=settings, catalog=catalog,
        executor=build_executor(ctx["redis"], client, settings), events=events,
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
