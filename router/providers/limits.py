"""Rate-limit headers in each provider's dialect: what is left, and how long an exhausted limit lasts.

Read on every answer, successes and 429s alike (a 429's headers often say more than its
Retry-After). The dialect is the provider profile's `limits.headers`; names, windows and units
per dialect, with their sources, are in docs/providers.md:

- openai:     x-ratelimit-{limit,remaining,reset}-{requests,tokens}; resets as durations ("6m0s").
- groq:       the same names; "requests" always count per day (RPD), "tokens" per minute (TPM);
              resets as durations ("2m59.56s", "7.66s").
- cerebras:   x-ratelimit-{limit,remaining,reset}-{requests,tokens}-{minute,hour,day}; resets
              in seconds ("33011.382867097855").
- openrouter: X-RateLimit-Limit / -Remaining / -Reset, the reset in epoch milliseconds; a 429
              carries them inside error.metadata.headers as well.
"""

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# A reset further away than this is a long (daily) cap, for dialects whose headers do not name
# their window: a per-minute window never resets that late.
_LONG_WAIT_S = 600.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_SCALE_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(frozen=True)
class QuotaReading:
    """What one answer's headers say about the key's quota."""

    remaining_requests: int | None = None
    limit_requests: int | None = None
    # Set when some limit is at zero: seconds until the longest such limit resets.
    wait_s: float | None = None
    daily: bool = False

    @property
    def empty(self) -> bool:
        return self.remaining_requests is None and self.limit_requests is None and self.wait_s is None


def parse_reset_s(value: str, now_s: float | None = None) -> float | None:
    """A reset hint in seconds: '7.66s', '2m59.56s', '1h2m', '250ms', a bare number of seconds,
    or a unix timestamp (seconds or milliseconds)."""
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        parts = _DURATION_PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            return None
        return sum(float(n) * _SCALE_S[u] for n, u in parts)
    now = time.time() if now_s is None else now_s
    if number > 1e12:  # epoch milliseconds
        return max(number / 1000 - now, 0.0)
    if number > 1e9:  # epoch seconds
        return max(number - now, 0.0)
    return max(number, 0.0)


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def read(headers: Mapping[str, str], dialect: str, now_s: float | None = None) -> QuotaReading:
    """The quota these response headers report, in the given dialect ("none": nothing)."""
    if dialect == "none" or not headers:
        return QuotaReading()
    h = _lower(headers)
    if dialect == "cerebras":
        return _cerebras(h, now_s)
    if dialect == "openrouter":
        return _single(h, "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", now_s)
    return _openai(h, requests_per_day=dialect == "groq", now_s=now_s)


def _openai(h: dict[str, str], requests_per_day: bool, now_s: float | None) -> QuotaReading:
    if "x-ratelimit-remaining-requests" not in h and "x-ratelimit-remaining-tokens" not in h:
        return _single(h, "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", now_s)
    remaining = _int(h.get("x-ratelimit-remaining-requests"))
    waits: list[tuple[float, bool]] = []
    for kind, per_day in (("requests", requests_per_day), ("tokens", False)):
        if _int(h.get(f"x-ratelimit-remaining-{kind}")) == 0:
            reset = parse_reset_s(h.get(f"x-ratelimit-reset-{kind}", ""), now_s)
            if reset:
                waits.append((reset, per_day or reset > _LONG_WAIT_S))
    wait_s, daily = max(waits) if waits else (None, False)
    return QuotaReading(remaining, _int(h.get("x-ratelimit-limit-requests")), wait_s, daily)


def _cerebras(h: dict[str, str], now_s: float | None) -> QuotaReading:
    waits: list[tuple[float, bool]] = []
    for kind in ("requests", "tokens"):
        for window in ("minute", "hour", "day"):
            if _int(h.get(f"x-ratelimit-remaining-{kind}-{window}")) == 0:
                reset = parse_reset_s(h.get(f"x-ratelimit-reset-{kind}-{window}", ""), now_s)
                if reset:
                    waits.append((reset, window == "day" or reset > _LONG_WAIT_S))
    wait_s, daily = max(waits) if waits else (None, False)
    # The request count that matters most for headroom: the narrowest window the answer reports.
    for window in ("minute", "hour", "day"):
        remaining = _int(h.get(f"x-ratelimit-remaining-requests-{window}"))
        if remaining is not None:
            return QuotaReading(remaining, _int(h.get(f"x-ratelimit-limit-requests-{window}")), wait_s, daily)
    return QuotaReading(None, None, wait_s, daily)


def _single(h: dict[str, str], limit: str, remaining: str, reset: str, now_s: float | None) -> QuotaReading:
    left = _int(h.get(remaining))
    wait_s = parse_reset_s(h[reset], now_s) if left == 0 and h.get(reset) else None
    return QuotaReading(left, _int(h.get(limit)), wait_s or None, bool(wait_s and wait_s > _LONG_WAIT_S))


def seconds_until_daily_reset(kind: str, now_s: float | None = None) -> float:
    """Seconds until the next daily boundary: "utc_midnight" or "pacific_midnight" (America/Los_Angeles)."""
    now = datetime.fromtimestamp(time.time() if now_s is None else now_s, tz=UTC)
    zone: tzinfo = UTC
    if kind == "pacific_midnight":
        try:
            zone = ZoneInfo("America/Los_Angeles")
        except ZoneInfoNotFoundError:  # no tz database: Pacific standard time, never late by more than an hour
            zone = timezone(timedelta(hours=-8))
    local = now.astimezone(zone)
    midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), tzinfo=zone)
    return max((midnight - now).total_seconds(), 1.0)
