"""Admission for /v1/chat/completions: the caller's key and all its limits in one Redis call.

One Lua script reads the key's record, refuses unknown and revoked keys, resolves the key's
limits (its own overrides, else its tier's defaults), stamps last-used, and charges requests
per minute, tokens per minute and requests per day, all or nothing. Nothing is cached in the
API process, so a revocation or a limit change holds on every replica from the next request.
"""

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import orjson
from fastapi import Request
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from api.auth import MASTER_RECORD, bearer_token, is_master_key, unauthorized
from api.keys import KeyRecord, hash_key, key_id_for_digest
from api.ratelimit import (
    CHARGE_LUA,
    Decision,
    Limit,
    RateLimiter,
    counter_ttl_ms,
    decide,
    limit_headers,
    rate_limited,
)
from settings import Settings
from workers.protocol import (
    API_KEY_LAST_USED,
    BYTES_PER_TOKEN,
    DAY_S,
    KEY_LIMITS_LUA,
    LIMIT_REQUESTS,
    LIMIT_REQUESTS_DAY,
    LIMIT_TOKENS,
    api_key_record_key,
)

RANDOM_MODEL_WINDOW_S = 3_600

# KEYS: record, last-used hash, then counters (requests/minute, tokens/minute, requests/day).
# ARGV: now (unix s), tier defaults JSON {"free": [rpm, tpm, rpd], ...}, 3 TTLs (ms), 3 costs.
# admit_key() returns nil for an unknown or revoked key, else
# {1, record JSON, rpm, tpm, rpd, charge()...} and the decoded record.
_ADMIT_KEY = CHARGE_LUA + KEY_LIMITS_LUA + """
local function admit_key()
  local raw = redis.call('GET', KEYS[1])
  if not raw then return nil end
  local record = cjson.decode(raw)
  if record.revoked == true then return nil end
  redis.call('HSET', KEYS[2], record.id, ARGV[1])
  local limits = key_limits(record, ARGV[2])
  local ttls = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])}
  local costs = {tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])}
  local out = {1, raw, limits[1], limits[2], limits[3]}
  for _, v in ipairs(charge(3, limits, ttls, costs)) do out[#out + 1] = v end
  return out, record
end
"""

_ADMIT = _ADMIT_KEY + """
local out = admit_key()
if not out then return {0} end
return out
"""

# Admission and enqueue in one round trip: the job goes on the queue only if the key is valid,
# within its limits, allowed to pin (ARGV[9] = '1' when the request pins an exact model: pro
# keys only) and, for a stream, within its open-stream limit. Extra KEYS: job key, queue, the
# key's stream set, the ready list (workers/protocol.ready_list_key). Extra ARGV: pins (9),
# job payload (10), job TTL ms (11), job id (12), enqueue time ms (13), unused (14), stream
# limit (15, 0 = none), stream expiry ms (16), stream set TTL ms (17), now ms (18). The job
# goes on arq's queue (its record) and, as "<id>\n<payload>" (workers/protocol.ready_entry),
# on the ready list, whose blocking pop hands it to one idle worker. Returns admit_key()'s
# reply, plus (when a limit allowed it) 'tier', 'streams' or 'queued'.
_ADMIT_AND_ENQUEUE = _ADMIT_KEY + """
local out, record = admit_key()
if not out then return {0} end
if out[6] ~= 1 then return out end
if ARGV[9] == '1' and record.tier ~= 'pro' then
  out[#out + 1] = 'tier'
  return out
end
local streams = tonumber(ARGV[15])
if streams > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', ARGV[18])
  if redis.call('ZCARD', KEYS[8]) >= streams then
    out[#out + 1] = 'streams'
    return out
  end
  redis.call('ZADD', KEYS[8], ARGV[16], ARGV[12])
  redis.call('PEXPIRE', KEYS[8], ARGV[17])
end
redis.call('SET', KEYS[6], ARGV[10], 'PX', ARGV[11])
redis.call('ZADD', KEYS[7], ARGV[13], ARGV[12])
redis.call('RPUSH', KEYS[9], ARGV[12] .. '\\n' .. ARGV[10])
redis.call('PEXPIRE', KEYS[9], ARGV[11])
out[#out + 1] = 'queued'
return out
"""


def estimate_prompt_tokens(body: bytes) -> int:
    """A quick upper-ish estimate of a request's prompt tokens: 4 bytes of JSON per token.

    It counts JSON punctuation and field names too, so it errs high; the real count from the
    provider's usage replaces it when the request ends (api/usage.py).
    """
    return max(1, math.ceil(len(body) / BYTES_PER_TOKEN))


@dataclass(frozen=True)
class Admission:
    """An admitted chat request: whose it is, what it was charged, and the headers to send."""

    key: KeyRecord
    decision: Decision | None  # None for the master key, which has no limits
    token_estimate: int
    admitted_at_s: float

    @property
    def headers(self) -> dict[str, str]:
        """x-ratelimit-* headers for every response to this request."""
        return limit_headers(self.decision) if self.decision is not None else {}

    @property
    def tokens_limit(self) -> Limit | None:
        """The tokens-per-minute limit charged at admission (corrected after the request)."""
        if self.decision is None:
            return None
        return next((s.limit for s in self.decision.states if s.limit.kind == "tokens"), None)


class Gatekeeper:
    """Runs admission and generic limits against one Redis; one per API process."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.limiter = RateLimiter(redis)
        self._settings = settings
        self._script = redis.register_script(_ADMIT)
        self._enqueue_script = redis.register_script(_ADMIT_AND_ENQUEUE)
        self._tier_defaults = orjson.dumps({tier: settings.tier_limits(tier) for tier in ("free", "pro")})

    def _limits(self, key_id: str, token_cost: int) -> list[Limit]:
        # limit=0 is a placeholder: the script resolves the real values from the record.
        window_s = self._settings.rate_window_s
        return [
            Limit(LIMIT_REQUESTS, key_id, 0, window_s),
            Limit(LIMIT_TOKENS, key_id, 0, window_s, cost=token_cost, kind="tokens"),
            Limit(LIMIT_REQUESTS_DAY, key_id, 0, DAY_S),
        ]

    async def admit(self, token: str, token_cost: int, now_s: float | None = None) -> tuple[KeyRecord, Decision]:
        """Authenticate a user key and charge its limits; 401 for unknown or revoked keys.

        The decision may be a refusal: the caller decides whether to raise rate_limited().
        """
        record, decision, _ = await self._run(self._script, token, token_cost, time.time() if now_s is None else now_s)
        return record, decision

    async def admit_and_enqueue(self, token: str, token_cost: int, job: "JobOnAdmit",
                                now_s: float) -> tuple[KeyRecord, Decision, str]:
        """admit(), and when the request passes, enqueue its job in the same round trip.

        The third value says what happened after the limits allowed the request: 'queued',
        'tier' (a free key pins an exact model: nothing queued) or 'streams' (the key's open
        streams are at their limit: nothing queued); '' when a limit refused it.
        """
        now_ms = int(now_s * 1000)
        keys = [job.job_key, job.queue, job.streams_key or job.job_key, job.ready_key]
        args: list[int | bytes | str] = [
            int(job.pins_model), job.payload, job.ttl_ms, job.job_id, job.score_ms, "",
            job.streams_limit if job.streams_key else 0, job.stream_expiry_ms,
            max(job.stream_expiry_ms - now_ms, 1000), now_ms]
        return await self._run(self._enqueue_script, token, token_cost, now_s, keys, args)

    async def _run(self, script: AsyncScript, token: str, token_cost: int, now: float,
                   extra_keys: Sequence[str] = (),
                   extra_args: Sequence[int | bytes | str] = ()) -> tuple[KeyRecord, Decision, str]:
        digest = hash_key(token)
        limits = self._limits(key_id_for_digest(digest), token_cost)
        keys = [api_key_record_key(digest), API_KEY_LAST_USED, *(limit.redis_key(now) for limit in limits),
                *extra_keys]
        args: list[int | bytes | str] = [int(now), self._tier_defaults,
                                         *(counter_ttl_ms(limit.window_s, now) for limit in limits),
                                         *(limit.cost for limit in limits), *extra_args]
        reply = await script(keys=keys, args=args)
        if int(reply[0]) == 0:
            # Same answer for unknown and revoked: do not tell which keys once existed.
            raise unauthorized("Incorrect API key provided.")
        record = KeyRecord.model_validate_json(reply[1])
        resolved = [replace(limit, limit=int(value)) for limit, value in zip(limits, reply[2:5], strict=True)]
        outcome = reply[10].decode() if len(reply) > 10 else ""
        return record, decide(resolved, reply[5:10], now), outcome


@dataclass(frozen=True)
class JobOnAdmit:
    """The job admit_and_enqueue() puts on arq's queue (same keys and format as Dispatcher.submit)."""

    job_id: str
    job_key: str
    queue: str
    payload: bytes
    ttl_ms: int
    score_ms: int
    ready_key: str  # the ready list, whose blocking pop hands the job to one worker
    pins_model: bool  # the request names an exact upstream model: pro keys only
    streams_key: str  # the key's open-stream set; "" when this request takes no stream slot
    streams_limit: int
    stream_expiry_ms: int


async def admit(request: Request, settings: Settings) -> Admission:
    """Admission on its own (the master key, or a body that fails validation: api/intake.py).

    401 for a bad key, 429 over a limit, else the Admission.
    """
    token = bearer_token(request)
    now = time.time()
    # Reading the body here is free: Starlette keeps it for the route's own request.body().
    estimate = estimate_prompt_tokens(await request.body())
    if is_master_key(settings, token):
        return Admission(MASTER_RECORD, None, estimate, now)
    gatekeeper: Gatekeeper = request.app.state.gatekeeper
    record, decision = await gatekeeper.admit(token, estimate, now)
    if not decision.allowed:
        raise rate_limited(decision)
    return Admission(record, decision, estimate, now)




def random_model_limit(key: KeyRecord, per_hour: int) -> Limit:
    """GET /v1/models/random's budget: `per_hour` calls per key per hour."""
    return Limit("random-hour", key.id, per_hour, RANDOM_MODEL_WINDOW_S)


async def charge_random_model(request: Request, key: KeyRecord, per_hour: int) -> dict[str, str]:
    """Charge one GET /v1/models/random (pass settings.models_random_per_hour); 429 when over.

    Returns the x-ratelimit-* headers for the successful response. The master key is not limited.
    """
    if key.kind == "master":
        return {}
    gatekeeper: Gatekeeper = request.app.state.gatekeeper
    decision = await gatekeeper.limiter.acquire([random_model_limit(key, per_hour)])
    if not decision.allowed:
        raise rate_limited(decision)
    return limit_headers(decision)
