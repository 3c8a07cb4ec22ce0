"""The batch runner: a background task in every worker process that leases batch lines from Redis.

Batch lines never enter the arq queue (a long-lived job there is re-checked by every poll of
every worker, see docs/batches.md); each worker leases a few lines at a time, runs them through
the same execute() as live jobs, and records each result exactly once. Fairness: lines are
taken round-robin across running batches, at most `batch_worker_concurrency` per worker (less
while its event loop lags, and minus the live requests it runs) and `batch_max_concurrency` per
batch in the whole pool. Each line is charged to its key's limits and billed to its usage like a
live request; a key at its limits pauses its batches instead of failing lines
(workers/batch_limits.py).
"""

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.failover import RunState
from settings.logfields import STORE_DOWN
from workers.batch_limits import BatchAccounting
from workers.batch_pacing import LagGovernor
from workers.batch_store import BatchStore, BatchView, Leased, output_line
from workers.jobs import WorkerState, error_event, execute
from workers.protocol import BatchSpec, ErrorBody, RouteInfo, fill_response

log = logging.getLogger("freeference.batches")

_REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)
# An API process that has not finished validating a batch after this long has died doing it.
VALIDATION_TIMEOUT_S = 600.0
# Transient outcomes: the line goes back to the queue (up to batch_line_max_attempts tries).
_RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
_MAX_RETRY_WAIT_S = 10.0


async def _ignore_route(_: RouteInfo) -> None:
    return None


async def _ignore_chunk(_: dict[str, Any]) -> None:
    return None


class BatchRunner:
    """Runs batch lines on one worker process, next to its live jobs."""

    def __init__(self, redis: Redis, state: WorkerState, accepting: Callable[[], bool]) -> None:
        self._state = state
        self._accepting = accepting  # False once the worker drains for shutdown
        self._settings = state.settings
        self._store = BatchStore(redis, state.worker_id, state.settings.file_expiry_s)
        self._accounting = BatchAccounting(redis, state.settings)
        self._lines: dict[str, dict[int, asyncio.Task[None]]] = {}  # batch id → idx → task
        self._finalizing: dict[str, asyncio.Task[None]] = {}
        self._slot_freed = asyncio.Event()
        self._turn = 0
        self._last_sweep = 0.0
        self._pacing = LagGovernor(state.settings.batch_worker_concurrency,
                                   state.settings.batch_loop_lag_target_ms / 1000)

    @property
    def in_flight(self) -> int:
        """Lines this process is running now."""
        return sum(len(tasks) for tasks in self._lines.values())

    async def run(self) -> None:
        """Tick until cancelled; Redis outages are waited out."""
        backoff_s = 0.05
        pacing = asyncio.create_task(self._pacing.watch(), name="batch-pacing")
        try:
            while True:
                self._slot_freed.clear()
                try:
                    await self._tick()
                    backoff_s = 0.05
                except _REDIS_DOWN as exc:
                    log.warning("batch runner: redis unavailable (%s)", type(exc).__name__, extra=STORE_DOWN)
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, 2.0)
                    continue
                except Exception:  # a bug must not stop this worker's batches for good: log, go on
                    log.exception("batch runner tick failed")
                    await asyncio.sleep(1.0)
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), self._settings.batch_poll_s)
        finally:
            pacing.cancel()
            await self._stop_all()

    async def _tick(self) -> None:
        views = await self._store.active()
        now = time.time()
        runnable: list[BatchView] = []
        for view in views:
            batch_id = view.spec.id
            if view.status == "validating":
                if now - view.spec.created_at > VALIDATION_TIMEOUT_S:
                    await self._store.fail_stale_validation(batch_id)
                continue
            if view.status == "in_progress" and not view.stop and now >= view.spec.expires_at:
                await self._store.expire(batch_id)
                view.stop = "expire"
            if view.stop or view.status != "in_progress":
                self._cancel_lines(batch_id)  # stopping: in-flight lines end as cancelled / expired
            if view.status == "finalizing":
                # Ours (an earlier attempt was interrupted) or a dead worker's: finish it.
                mine = view.finalizer == self._store.worker_id
                if view.finalizer and (mine or not await self._store.alive(view.finalizer)):
                    self._start_finalize(view, take_over_from=view.finalizer)
            elif view.stop or view.remaining <= 0:
                self._start_finalize(view)
            else:
                runnable.append(view)
        if now - self._last_sweep >= 1.0:
            self._last_sweep = now
            moved = 0
            for view in views:
                if view.status != "validating":
                    moved += await self._store.reclaim(view.spec.id, set(self._lines.get(view.spec.id, {})))
            if moved:
                log.info("re-queued %d batch lines (their worker died, or a release failed)", moved)
            expired = await self._store.expire_files(now)
            if expired:
                log.info("deleted %d expired files", expired)
        await self._fill(runnable)

    async def _fill(self, runnable: list[BatchView]) -> None:
        """Lease lines round-robin across running batches, as far as this worker has room."""
        settings = self._settings
        # The pacing limit follows the event loop's lag (workers/batch_pacing.py), and live
        # requests running here take batch slots one for one: live work always comes first.
        free = self._pacing.limit - self.in_flight - len(self._state.running)
        if not runnable or free <= 0 or not self._accepting():
            return
        self._turn = (self._turn + 1) % len(runnable)
        order = runnable[self._turn:] + runnable[:self._turn]
        share = max(1, math.ceil(free / len(order)))
        for view in order:
            if free <= 0:
                break
            spec = view.spec
            charged_at = time.time()
            budget = await self._accounting.budget(spec.owner, charged_at)
            claim = await self._store.claim(spec.id, min(share, free), settings.batch_max_concurrency, budget)
            if claim.state == "revoked" and await self._store.stop_revoked(spec.id):
                log.info("batch %s stopped: its key was revoked", spec.id)
            free -= len(claim.leased)
            tasks = self._lines.setdefault(spec.id, {})
            for leased in claim.leased:
                tasks[leased.idx] = asyncio.create_task(self._run_line(spec, leased, charged_at),
                                                        name=f"batch-line-{leased.idx}")

    async def _run_line(self, spec: BatchSpec, leased: Leased, charged_at_s: float) -> None:
        batch_id, idx = spec.id, leased.idx
        try:
            await self._run_and_record(spec, leased, charged_at_s)
        except asyncio.CancelledError:
            # Batch stopping or worker shutting down: hand the line back (the sweep does it if
            # Redis is unreachable, once this worker's heartbeat lapses).
            with contextlib.suppress(*_REDIS_DOWN, RedisError):
                await asyncio.shield(self._store.release(batch_id, idx))
            raise
        except _REDIS_DOWN as exc:
            log.warning("batch line %s/%d not recorded (redis: %s); it will be re-run", batch_id, idx,
                        type(exc).__name__)
        finally:
            tasks = self._lines.get(batch_id, {})
            tasks.pop(idx, None)
            if not tasks:
                self._lines.pop(batch_id, None)
            self._slot_freed.set()

    async def _run_and_record(self, spec: BatchSpec, leased: Leased, charged_at_s: float) -> None:
        """Run one line through the live routing path; bill it, then record its result or re-queue it."""
        settings = self._settings
        batch_id, idx, line = spec.id, leased.idx, leased.line
        request_id = "req_" + uuid.uuid4().hex
        if leased.too_big:  # as a live request this large would be refused, nothing runs
            left = await self._store.record(spec, idx, line.custom_id, _too_big(line.custom_id, request_id), "failed")
            if left == 0:
                self._slot_freed.set()
            return
        job = line.job.model_copy(update={
            "job_id": uuid.uuid4().hex, "request_id": request_id,
            "deadline_unix_ms": int((time.time() + settings.request_timeout_s) * 1000)})
        run = RunState()
        try:
            done = await execute(job, self._state, run, _ignore_route, _ignore_chunk)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure kind is mapped to a status; see error_event
            event = error_event(exc, run)
            await self._accounting.bill(spec.owner, leased, charged_at_s, job.requested_model or "auto", usage=None,
                                        failed=True, failures=event.failures, served_by=None)
            if event.status in _RETRYABLE_STATUS:
                await asyncio.sleep(min(event.retry_after_s or 0.5, _MAX_RETRY_WAIT_S))
                again = await self._store.release(batch_id, idx, settings.batch_line_max_attempts)
                if again != 0:  # re-queued (1) or the lease went to another worker (-1)
                    return
            body: Any = {"error": event.error.model_dump()}
            result = output_line(line.custom_id, request_id, event.status, body)
            left = await self._store.record(spec, idx, line.custom_id, result, "failed")
        else:
            answer = done.completion if line.response_echo is None else \
                fill_response(line.response_echo, done.completion or {}, done.route.model)
            result = output_line(line.custom_id, request_id, 200, answer)
            left, _ = await asyncio.gather(
                self._store.record(spec, idx, line.custom_id, result, "completed", done.usage),
                self._accounting.bill(spec.owner, leased, charged_at_s, done.route.model, usage=done.usage,
                                      failed=False, failures=done.failures, served_by=done.route.provider))
        if left == 0:
            self._slot_freed.set()  # the next tick finalizes

    def _cancel_lines(self, batch_id: str) -> None:
        for task in self._lines.get(batch_id, {}).values():
            if not task.cancelling():  # once: a second cancel would interrupt the lease release
                task.cancel()

    def _start_finalize(self, view: BatchView, take_over_from: str = "") -> None:
        batch_id = view.spec.id
        if batch_id in self._finalizing or self._lines.get(batch_id):
            return
        task = asyncio.create_task(self._finalize(view, take_over_from), name=f"batch-finalize-{batch_id}")
        self._finalizing[batch_id] = task
        task.add_done_callback(lambda _: self._finalizing.pop(batch_id, None))

    async def _finalize(self, view: BatchView, take_over_from: str) -> None:
        try:
            claimed = await self._store.begin_finalize(view.spec.id, take_over_from)
            if claimed and await self._store.finalize(view.spec, view.stop):
                log.info("batch %s finalized", view.spec.id)
        except _REDIS_DOWN as exc:
            # Left in `finalizing` with this worker as finalizer: retried on a later tick.
            log.warning("batch %s: finalize interrupted (redis: %s)", view.spec.id, type(exc).__name__)

    async def _stop_all(self) -> None:
        tasks = [t for lines in self._lines.values() for t in lines.values()] + list(self._finalizing.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)


def _too_big(custom_id: str, request_id: str) -> bytes:
    """The result of a line that needs more tokens than its key's whole per-minute limit."""
    error = ErrorBody(message="This request needs more tokens than your key's whole tokens-per-minute limit; "
                              "send a smaller request or raise the key's limit.",
                      type="rate_limit_error", code="rate_limit_exceeded")
    return output_line(custom_id, request_id, 429, {"error": error.model_dump()})


async def run_batches(redis: Redis, state: WorkerState, accepting: Callable[[], bool]) -> None:
    """Entry point for workers/main.py: the batch runner of this worker process (`accepting`
    turns False while the worker drains: lines in flight finish, no new ones are leased)."""
    await BatchRunner(redis, state, accepting).run()
