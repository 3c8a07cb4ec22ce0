"""The atomic multi-window limiter, run against the session's private Valkey (its Lua is the point)."""

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from api.ratelimit import Decision, Limit, LimitState, RateLimiter, format_reset, limit_headers, rate_limited

# A fixed instant in the middle of a 60 s window, so tests never straddle a window edge.
T0 = 1_800_000_030.0


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url.rsplit("/", 1)[0] + "/0")
    await client.flushdb()
    yield client
    await client.aclose()


async def test_concurrent_acquires_admit_exactly_the_limit(redis: Redis) -> None:
    limiter = RateLimiter(redis)
    limit = Limit("requests", "key_a", limit=7, window_s=60)
    decisions = await asyncio.gather(*(limiter.acquire([limit], now_s=T0) for _ in range(40)))
    assert sum(d.allowed for d in decisions) == 7
    refused = [d for d in decisions if not d.allowed]
    assert all(d.blocking == limit and d.states[0].remaining == 0 for d in refused)


async def test_all_or_nothing_across_limits(redis: Redis) -> None:
    limiter = RateLimiter(redis)
    per_minute = Limit("requests", "key_b", limit=100, window_s=60)
    per_day = Limit("requests-day", "key_b", limit=2, window_s=86_400)
    assert (await limiter.acquire([per_minute, per_day], now_s=T0)).allowed
    assert (await limiter.acquire([per_minute, per_day], now_s=T0)).allowed
    refused = await limiter.acquire([per_minute, per_day], now_s=T0)
    assert not refused.allowed and refused.blocking == per_day
    # The refusal did not eat the per-minute budget: 98 left, not 97.
    assert refused.states[0].remaining == 98
    assert int(await redis.get(per_minute.redis_key(T0))) == 2


async def test_costs_are_charged_in_units(redis: Redis) -> None:
    limiter = RateLimiter(redis)
    first = await limiter.acquire([Limit("tokens", "key_c", 1000, 60, cost=600, kind="tokens")], now_s=T0)
    assert first.allowed and first.states[0].remaining == 400
    second = await limiter.acquire([Limit("tokens", "key_c", 1000, 60, cost=500, kind="tokens")], now_s=T0)
    assert not second.allowed and second.states[0].remaining == 400


async def test_window_resets(redis: Redis) -> None:
    limiter = RateLimiter(redis)
    limit = Limit("requests", "key_d", limit=1, window_s=60)
    assert (await limiter.acquire([limit], now_s=T0)).allowed
    refused = await limiter.acquire([limit], now_s=T0 + 29)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(1.0)
    assert (await limiter.acquire([limit], now_s=T0 + 30)).allowed  # next window


async def test_counters_expire_when_their_window_ends(redis: Redis) -> None:
    limiter = RateLimiter(redis)
    limit = Limit("requests", "key_e", limit=5, window_s=2)
    await limiter.acquire([limit])
    keys = [k async for k in redis.scan_iter(match="ff:rl:key_e:*")]
    assert len(keys) == 1
    ttl_ms = await redis.pttl(keys[0])
    assert 0 < ttl_ms <= 3000  # the rest of the window plus a one-second margin


def _decision(allowed: bool, *states: tuple[Limit, int, float]) -> Decision:
    built = tuple(LimitState(limit, remaining, reset) for limit, remaining, reset in states)
    blocking = next((s.limit for s in built if s.remaining == 0), None) if not allowed else None
    return Decision(allowed, built, blocking)


def test_headers_report_the_tightest_limit_per_kind() -> None:
    rpm = Limit("requests", "k", 60, 60)
    rpd = Limit("requests-day", "k", 1000, 86_400)
    tpm = Limit("tokens", "k", 5000, 60, kind="tokens")
    headers = limit_headers(_decision(True, (rpm, 59, 20.2), (rpd, 3, 3600.0), (tpm, 4900, 20.2)))
    assert headers == {
        "x-ratelimit-limit-requests": "1000", "x-ratelimit-remaining-requests": "3",
        "x-ratelimit-reset-requests": "1h0m0s",
        "x-ratelimit-limit-tokens": "5000", "x-ratelimit-remaining-tokens": "4900",
        "x-ratelimit-reset-tokens": "21s",
    }


def test_rate_limited_is_an_openai_429_with_retry_headers() -> None:
    rpm = Limit("requests", "k", 10, 60)
    error = rate_limited(_decision(False, (rpm, 0, 12.3)))
    assert error.status == 429
    assert error.body.code == "rate_limit_exceeded"
    assert "requests per minute" in error.body.message
    assert error.headers["Retry-After"] == "13"
    assert error.headers["retry-after-ms"] == "12300"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"


def test_rate_limited_refuses_an_allowed_decision() -> None:
    with pytest.raises(ValueError):
        rate_limited(Decision(True, ()))


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (0.2, "1s"), (59, "59s"), (60, "1m0s"), (3723, "1h2m3s")])
def test_format_reset(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text
