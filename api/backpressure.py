"""Limits that protect the service: in-flight requests per API process, open streams per key.

A process that is full, or whose worker pool cannot take another job soon (api/pool_load.py),
answers 503 with Retry-After at once, before reading the body, instead of queueing without
bound (the caller or its load balancer retries elsewhere). The per-key
stream limit is one Lua call in Redis, so it holds across every API replica; each open stream
is a sorted-set member that expires with its request's deadline, so a crashed API process
cannot leak a key's slots for longer than that.
"""

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import OpenAIError, error_response
from api.metrics import LIMIT_HEADER
from api.pool_load import PoolLoad
from settings.logfields import STORE_DOWN
from workers.protocol import ChatJob, key_streams_key

log = logging.getLogger("freeference.backpressure")

# Callbacks run when the response has ended (stream slots), kept in the request's scope state.
_ON_FINISH = "ff_on_finish"

# KEYS[1] the key's stream set. ARGV: now ms, this stream's expiry ms, limit, member, set TTL ms.
_ACQUIRE_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


def overloaded(limit: int) -> OpenAIError:
    """503 for a process that already serves its maximum of requests."""
    return OpenAIError(503, f"This gateway process is at its limit of {limit} requests in flight; retry shortly.",
                       code="overloaded", headers={"Retry-After": "1", LIMIT_HEADER: "process_inflight"})


class InflightLimitMiddleware:
    """Pure ASGI: refuses requests to the guarded paths beyond `max_inflight` at once (0 = no limit)."""

    def __init__(self, app: ASGIApp, max_inflight: int, paths: tuple[str, ...]) -> None:
        self.app = app
        self.max_inflight = max_inflight
        self.paths = paths
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guarded = scope["path"] in self.paths
        if guarded:
            error = overloaded(self.max_inflight) if self.max_inflight and self.inflight >= self.max_inflight else None
            pool: PoolLoad | None = getattr(scope["app"].state, "pool_load", None) if "app" in scope else None
            if error is None and pool is not None:
                error = pool.refusal()
            if error is not None:
                await error_response(error.status, error.body, error.headers, scope["path"])(scope, receive, send)
                return
        callbacks: list[Callable[[], Awaitable[None]]] = []
        scope.setdefault("state", {})[_ON_FINISH] = callbacks
        if guarded:
            self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            if guarded:
                self.inflight -= 1
            for callback in callbacks:
                await callback()


class StreamLimiter:
    """At most `limit` open streams per key, across all API replicas (0 = no limit)."""

    def __init__(self, redis: Redis, limit: int) -> None:
        self._redis = redis
        self._limit = limit
        self._acquire = redis.register_script(_ACQUIRE_LUA)

    async def acquire(self, request: Request, key_id: str, job: ChatJob) -> None:
        """Take a slot for a streaming job (released when the response ends) or raise 429."""
        slot = self.slot(request, key_id, job)
        if slot is None:
            return
        key, expiry_ms = slot
        now_ms = int(time.time() * 1000)
        granted = await self._acquire(keys=[key], args=[now_ms, expiry_ms, self._limit, job.job_id,
                                                        max(expiry_ms - now_ms, 1000)])
        if not granted:
            raise self.refusal()
        self.granted(request, key, job.job_id)

    @property
    def limit(self) -> int:
        return self._limit

    def slot(self, request: Request, key_id: str, job: ChatJob) -> tuple[str, int] | None:
        """(the key's stream set, this stream's expiry ms) when the job must take a slot, else None.

        The admission script takes the slot itself on the combined path (api/admission.py).
        """
        if not job.stream or not self._limit or request.scope.get("state", {}).get(_ON_FINISH) is None:
            return None  # no slot needed, no limit, or no middleware to release it
        return key_streams_key(key_id), job.deadline_unix_ms + 5_000

    def refusal(self) -> OpenAIError:
        return OpenAIError(429, f"Too many concurrent streams for this key: at most {self._limit} at once.",
                           code="rate_limit_exceeded", headers={"Retry-After": "1", LIMIT_HEADER: "streams_per_key"})

    def granted(self, request: Request, key: str, member: str) -> None:
        """Release the slot when the response ends."""
        finish: list[Any] = request.scope["state"][_ON_FINISH]

        async def release() -> None:
            try:
                await self._redis.zrem(key, member)
            except (RedisError, OSError) as exc:  # the slot expires with the request's deadline
                log.warning("stream slot not released (%s)", type(exc).__name__, extra=STORE_DOWN)

        finish.append(release)
