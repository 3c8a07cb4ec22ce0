"""Atomic rate limits in Redis: several fixed windows checked and charged in one Lua call.

Fixed windows (key = limit name + window index, TTL = until the window ends) are exact under
any number of API replicas: a burst of N against a limit of L admits exactly L. All limits of
one call are charged together or not at all, so a request refused by its daily limit does not
eat its per-minute budget.
"""

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from api.errors import OpenAIError
from workers.protocol import CHARGE_LUA, counter_key, counter_ttl_ms, window_reset_s

__all__ = ["CHARGE_LUA", "Decision", "Limit", "RateLimiter", "counter_key", "counter_ttl_ms", "decide",
           "limit_headers", "rate_limited", "window_reset_s"]

# ARGV: (limit, ttl_ms, cost) per key.
_ACQUIRE = CHARGE_LUA + """
local limits, ttls, costs = {}, {}, {}
for i = 1, #KEYS do
  limits[i] = tonumber(ARGV[(i - 1) * 3 + 1])
  ttls[i] = tonumber(ARGV[(i - 1) * 3 + 2])
  costs[i] = tonumber(ARGV[(i - 1) * 3 + 3])
end
return charge(1, limits, ttls, costs)
"""

HeaderKind = Literal["requests", "tokens"]


@dataclass(frozen=True)
class Limit:
    """`limit` units per `window_s`, charged `cost` units by this call."""

    name: str  # e.g. "requests", "tokens", "requests-day", "random-hour"
    subject: str  # whose budget: a key id
    limit: int
    window_s: int
    cost: int = 1
    # Which x-ratelimit-*-{requests,tokens} headers this limit reports through.
    kind: HeaderKind = "requests"

    def redis_key(self, now_s: float) -> str:
        return counter_key(self.subject, self.name, self.window_s, now_s)

    def reset_s(self, now_s: float) -> float:
        return window_reset_s(self.window_s, now_s)


@dataclass(frozen=True)
class LimitState:
    limit: Limit
    remaining: int
    reset_s: float


@dataclass(frozen=True)
class Decision:
    allowed: bool
    states: tuple[LimitState, ...]
    blocking: Limit | None = None

    @property
    def retry_after_s(self) -> float:
        """When the blocking window ends (0 when allowed)."""
        if self.blocking is None:
            return 0.0
        return next(s.reset_s for s in self.states if s.limit is self.blocking)


def decide(limits: Sequence[Limit], reply: Sequence[int], now_s: float) -> Decision:
    """A Decision from the reply of CHARGE_LUA's charge() for these limits."""
    allowed, blocking_index, *remaining = (int(v) for v in reply)
    states = tuple(LimitState(limit, max(rem, 0), limit.reset_s(now_s))
                   for limit, rem in zip(limits, remaining, strict=True))
    blocking = limits[blocking_index - 1] if not allowed else None
    return Decision(bool(allowed), states, blocking)


class RateLimiter:
    """Charges any set of Limits atomically; one round trip."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._script = redis.register_script(_ACQUIRE)

    async def acquire(self, limits: Sequence[Limit], now_s: float | None = None) -> Decision:
        """Charge every limit or none."""
        if not limits:
            return Decision(True, ())
        now = time.time() if now_s is None else now_s
        keys = [limit.redis_key(now) for limit in limits]
        args: list[int] = []
        for limit in limits:
            args += [limit.limit, counter_ttl_ms(limit.window_s, now), limit.cost]
        reply = await self._script(keys=keys, args=args)
        return decide(limits, reply, now)


def format_reset(seconds: float) -> str:
    """OpenAI's duration style for x-ratelimit-reset-*: '1s', '6m0s', '1h2m3s'."""
    total = max(math.ceil(seconds), 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def limit_headers(decision: Decision) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens}, plus Retry-After when refused.

    Several limits of one kind (requests per minute and per day) report the one with the
    least left, since that is the one the caller will hit first.
    """
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        states = [s for s in decision.states if s.limit.kind == kind]
        if not states:
            continue
        tightest = min(states, key=lambda s: (s.remaining, -s.reset_s))
        headers[f"x-ratelimit-limit-{kind}"] = str(tightest.limit.limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(tightest.remaining)
        headers[f"x-ratelimit-reset-{kind}"] = format_reset(tightest.reset_s)
    if not decision.allowed:
        # The OpenAI SDKs read retry-after-ms first, then Retry-After (whole seconds).
        wait_s = max(decision.retry_after_s, 0.001)
        headers["retry-after-ms"] = str(math.ceil(wait_s * 1000))
        headers["Retry-After"] = str(max(1, math.ceil(wait_s)))
    return headers


_DESCRIPTIONS: Mapping[str, str] = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "requests-day": "requests per day",
    "random-hour": "GET /v1/models/random calls per hour",
}


def rate_limited(decision: Decision) -> OpenAIError:
    """The 429 for a refused Decision, with Retry-After and x-ratelimit-* headers."""
    blocking = decision.blocking
    if blocking is None:
        raise ValueError("rate_limited() needs a refused decision")
    what = _DESCRIPTIONS.get(blocking.name, f"{blocking.name} per {blocking.window_s}s")
    message = (f"Rate limit reached for {what}: limit {blocking.limit}. "
               f"Try again in {format_reset(decision.retry_after_s)}.")
    if blocking.cost > blocking.limit:
        message = (f"This request needs about {blocking.cost} units of {what}, more than your whole "
                   f"limit of {blocking.limit}; send a smaller request or raise the key's limit.")
    return OpenAIError(429, message, code="rate_limit_exceeded", headers=limit_headers(decision))
