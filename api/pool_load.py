"""Whether the worker pool can take another job soon, from the load records the workers publish.

Each worker writes a small record a few times a second (workers/capacity.py): the jobs it could
start now by its measured capacity, how fast it finishes jobs, when the record expires. This
process reads all of them and the length of the ready list in one pipelined round trip per
interval, in the background, so the decision per request costs no Redis call:

    free = ⌈(Σ room − queued + Σ finished/s × horizon) / API replicas⌉ − admitted here since the last read

where the horizon is half the pickup deadline: a job admitted now should be picked up well
within it. Every API replica reads the same records and counts only its own admissions between
reads, so each takes an equal share of the room (replicas mark their presence in a sorted set,
`ff:apis`, in the same round trip): two replicas each admitting the whole room
within one interval put twice the room on the queue, and the overflow waited out the pickup
deadline as 503 `no_workers`. A share is small only near capacity, and for one interval: a
replica that gets all the traffic still fills the pool within a few reads.

A worker whose loop is late takes nothing until it catches up, so its room counts only as far
as its recent rate of starting jobs gets through within the horizon (with two workers sharing a
loaded machine, counting their whole room admitted jobs that then waited out the pickup
deadline). While `free` is positive the request is queued; otherwise it is answered 503 with
Retry-After at once (before its body is read) instead of after a pickup deadline spent waiting.
A busy worker whose record expired within the last pickup deadline is late, and adds no room. With
no record at all, or only older ones (no worker, a killed one, or workers of an earlier release
that publish none) it decides nothing: the pickup deadline answers, as before.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable
from typing import cast

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.errors import OpenAIError
from api.metrics import LIMIT_HEADER
from workers.protocol import API_REPLICAS_KEY, POOL_LOAD_KEY, WorkerLoad, ready_list_key

log = logging.getLogger("freeference.pool")

# A record this long past its expiry belongs to a worker that died without deleting it.
_STALE_DROP_S = 60.0
_RETRY_AFTER_MAX_S = 30


class PoolLoad:
    """The pool's load as last read; `refusal()` decides one request."""

    def __init__(self, redis: Redis, queue_name: str, every_s: float, pickup_timeout_s: float,
                 process_id: str = "") -> None:
        self._redis = redis
        self._process_id = process_id
        self._ready = ready_list_key(queue_name)
        self._every_s = every_s
        self._horizon_s = pickup_timeout_s / 2
        # A record expired longer ago than a pickup deadline may be a killed worker's: unknown.
        self._late_window_s = pickup_timeout_s
        self._known = False
        self._room = 0
        self._queued = 0
        self._finished_per_s = 0.0
        self._admitted = 0
        self._replicas = 1
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="pool-load")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RedisError, OSError):  # else it lapses within a few reads
            await cast(Awaitable[int], self._redis.zrem(API_REPLICAS_KEY, self._process_id))

    def refusal(self) -> OpenAIError | None:
        """None to admit one more job (counted until the next read), else the 503 to answer."""
        if not self._known:
            return None
        slots = math.floor(self._room - self._queued + self._finished_per_s * self._horizon_s)
        # Rounded up, so that the last few slots are not refused by every replica: the replicas
        # together overshoot by fewer jobs than there are replicas, not by the room.
        if slots >= 1 and self._admitted < math.ceil(slots / self._replicas):
            self._admitted += 1
            return None
        return pool_full(self._retry_after_s())

    def _retry_after_s(self) -> int:
        # When the jobs ahead would be picked up at the pool's current finishing rate.
        if self._finished_per_s <= 0:
            return 2
        ahead = self._queued + self._admitted * self._replicas - self._room + 1
        return min(max(math.ceil(ahead / self._finished_per_s), 1), _RETRY_AFTER_MAX_S)

    def observe(self, records: dict[bytes, bytes], queued: int, now_unix_s: float, replicas: int = 1) -> list[bytes]:
        """Take one read of the records, the queue and the API replicas; returns long-dead workers' fields."""
        now_ms = now_unix_s * 1000
        fresh: list[WorkerLoad] = []
        late: list[WorkerLoad] = []
        dead: list[bytes] = []
        for worker, raw in records.items():
            try:
                load = WorkerLoad.model_validate_json(raw)
            except ValidationError:
                continue
            if load.expires_unix_ms >= now_ms:
                fresh.append(load)
            elif load.expires_unix_ms >= now_ms - self._late_window_s * 1000:
                late.append(load)
            elif load.expires_unix_ms < now_ms - _STALE_DROP_S * 1000:
                dead.append(worker)
        # A worker whose record lapsed moments ago is alive but too late to publish (its heartbeat,
        # written by a thread, says whether it is alive). Busy when it went quiet, it takes nothing
        # soon: with only such workers the pool is full, not unknown (admitted blindly, a burst on
        # an overloaded machine waited out its pickup deadline as 503 `no_workers`). Idle when it
        # went quiet (starting, or a machine-wide stall), it catches up long before a pickup deadline.
        self._known = bool(fresh or late)
        self._room = (sum(self._room_soon(load) for load in fresh)
                      + sum(load.room for load in late if load.running == 0))
        self._finished_per_s = sum(load.finished_per_s for load in fresh)
        self._queued = queued
        self._admitted = 0
        self._replicas = max(replicas, 1)  # this process is one, even before its presence is read back
        return dead

    def _room_soon(self, load: WorkerLoad) -> int:
        # An idle worker's late loop is a moment's hiccup (its start-up, a stall of the whole
        # machine), not a full worker: a fresh gateway refused its first requests with 503.
        if not load.lagging or load.running == 0:
            return load.room
        return min(load.room, int(load.started_per_s * self._horizon_s))

    async def _follow(self) -> None:
        while True:
            try:
                now_ms = int(time.time() * 1000)
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.hgetall(POOL_LOAD_KEY)
                    pipe.llen(self._ready)
                    # This replica is present for a few reads more; replicas that stopped reading lapse.
                    pipe.zadd(API_REPLICAS_KEY, {self._process_id: now_ms + int(self._every_s * 4000)})
                    pipe.zremrangebyscore(API_REPLICAS_KEY, "-inf", now_ms)
                    pipe.zcard(API_REPLICAS_KEY)
                    records, queued, _, _, replicas = await pipe.execute()
                dead = self.observe(records, int(queued), time.time(), replicas=int(replicas))
                if dead:
                    await cast(Awaitable[int], self._redis.hdel(POOL_LOAD_KEY, *dead))  # type: ignore[arg-type]
            except (RedisError, OSError) as exc:
                # Unknown load: admit, and let the pickup deadline answer (the enqueue fails anyway
                # while Redis is down).
                self._known = False
                log.debug("pool load not read (%s)", type(exc).__name__)
            await asyncio.sleep(self._every_s)


def pool_full(retry_after_s: int) -> OpenAIError:
    """503 for a request no worker can take soon."""
    return OpenAIError(503, "Every worker of the gateway is at its capacity; retry shortly.", code="overloaded",
                       headers={"Retry-After": str(retry_after_s), LIMIT_HEADER: "worker_pool"})
