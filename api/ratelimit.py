"""Atomic rate limits in Redis: several fixed windows checked and charged in one Lua call.

Fixed windows (key = limit name + window index, TTL = window) are exact under any number of
API replicas: a burst of N against a limit of L admits exactly L. All limits of one call are
charged together or not at all, so a request refused by its daily limit does not eat its
per-minute budget.
"""

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

# KEYS: one counter key per limit. ARGV: now_ms, then (limit, window_ms, cost) per key.
# Returns {allowed, i_blocking, ...remaining per limit...}.
_ACQUIRE = """
local now = tonumber(ARGV[1])
local n = #KEYS
local counts = {}
local blocking = 0
for i = 1, n do
  counts[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  local limit = tonumber(ARGV[2 + (i - 1) * 3])
  local cost = tonumber(ARGV[4 + (i - 1) * 3])
  if blocking == 0 and counts[i] + cost > limit then blocking = i end
end
local out = {blocking == 0 and 1 or 0, blocking}
for i = 1, n do
  local limit = tonumber(ARGV[2 + (i - 1) * 3])
  local window = tonumber(ARGV[3 + (i - 1) * 3])
  local cost = tonumber(ARGV[4 + (i - 1) * 3])
  local value = counts[i]
  if blocking == 0 then
    value = redis.call('INCRBY', KEYS[i], cost)
    if value == cost then redis.call('PEXPIRE', KEYS[i], window) end
  end
  out[#out + 1] = limit - value
end
return out
"""


@dataclass(frozen=True)
class Limit:
    """`limit` units per `window_s`, charged `cost` units by this call."""

    name: str  # e.g. "requests", "tokens", "requests-day", "random-hour"
    subject: str  # whose budget: a key id
    limit: int
    window_s: int
    cost: int = 1

    def window_index(self, now_s: float) -> int:
        return int(now_s // self.window_s)

    def redis_key(self, now_s: float) -> str:
        return f"ff:rl:{self.subject}:{self.name}:{self.window_s}:{self.window_index(now_s)}"

    def reset_s(self, now_s: float) -> float:
        return (self.window_index(now_s) + 1) * self.window_s - now_s


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


class RateLimiter:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._script = redis.register_script(_ACQUIRE)

    async def acquire(self, limits: Sequence[Limit], now_s: float | None = None) -> Decision:
        """Charge every limit or none; one round trip."""
        if not limits:
            return Decision(True, ())
        now = time.time() if now_s is None else now_s
        keys = [limit.redis_key(now) for limit in limits]
        args: list[int] = [int(now * 1000)]
        for limit in limits:
            args += [limit.limit, limit.window_s * 1000, limit.cost]
        raw = await self._script(keys=keys, args=args)
        allowed, blocking_index, *remaining = (int(v) for v in raw)
        states = tuple(LimitState(limit, max(rem, 0), limit.reset_s(now)) for limit, rem in zip(limits, remaining,
                                                                                                strict=True))
        blocking = limits[blocking_index - 1] if not allowed else None
        return Decision(bool(allowed), states, blocking)


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
