"""The key check at the edge: from the headers alone, before a byte of the body is read.

A bogus key must cost the gateway less than it costs the sender: it is refused (401, connection
closed) before the body is read, so a flood of bogus keys with slow or huge bodies holds no
connection and no memory. The check reads the key's record from Redis, except:

- the master key, compared locally;
- a key refused in the last few seconds (a flood repeats its key), refused again locally;
- on routes whose admission script checks the key again in its own round trip (chat), a key
  admitted in the last minute passes locally: a key revoked meanwhile still gets its 401 from
  that script, one body read later. Every other route gets the record read here, fresh, so
  a revocation holds from the next request on every replica, as before.
"""

import time

from redis.asyncio import Redis
from starlette.datastructures import Headers
from starlette.types import Scope

from api.auth import KEY_RECORD_STATE, MASTER_RECORD, is_master_key, presented_key, unauthorized
from api.keys import hash_key, lookup_digest
from settings import Settings

_ADMITTED_TTL_S = 60.0
_REFUSED_TTL_S = 10.0
# Bounds on the two memories: a flood of distinct bogus keys must not grow the process.
_MAX_REMEMBERED = 50_000


class _Memory:
    """Digest → expiry (monotonic s), oldest evicted first once full."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._until: dict[str, float] = {}

    def __contains__(self, digest: str) -> bool:
        until = self._until.get(digest)
        if until is None:
            return False
        if until < time.monotonic():
            del self._until[digest]
            return False
        return True

    def add(self, digest: str) -> None:
        self._until.pop(digest, None)
        while len(self._until) >= _MAX_REMEMBERED:
            del self._until[next(iter(self._until))]
        self._until[digest] = time.monotonic() + self._ttl_s

    def discard(self, digest: str) -> None:
        self._until.pop(digest, None)


class KeyGate:
    """One per API process (app.state.key_gate)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._admitted = _Memory(_ADMITTED_TTL_S)
        self._refused = _Memory(_REFUSED_TTL_S)

    async def check(self, scope: Scope, admission_rechecks: bool) -> str | None:
        """Raise the 401 for a missing, malformed, unknown or revoked key; else the key's digest (None: master).

        `admission_rechecks`: the route's admission script checks the key itself, so a key
        admitted recently needs no read here.
        """
        token = presented_key(Headers(scope=scope))
        if is_master_key(self._settings, token):
            scope["state"][KEY_RECORD_STATE] = MASTER_RECORD
            return None
        digest = hash_key(token)
        if digest in self._refused:
            raise unauthorized("Incorrect API key provided.")
        if admission_rechecks and digest in self._admitted:
            return digest
        record = await lookup_digest(self._redis, digest)
        if record is None or record.revoked:
            self._admitted.discard(digest)
            self._refused.add(digest)
            raise unauthorized("Incorrect API key provided.")
        self._admitted.add(digest)
        scope["state"][KEY_RECORD_STATE] = record
        return digest

