"""Rate-limit headers in each dialect, with the providers' documented example values."""

import time

import pytest

from router.providers.limits import parse_reset_s, read, seconds_until_daily_reset

NOW_S = 1_790_000_000.0

# console.groq.com/docs/rate-limits ("values are illustrative")
GROQ = {"retry-after": "2", "x-ratelimit-limit-requests": "14400", "x-ratelimit-limit-tokens": "18000",
        "x-ratelimit-remaining-requests": "14370", "x-ratelimit-remaining-tokens": "17997",
        "x-ratelimit-reset-requests": "2m59.56s", "x-ratelimit-reset-tokens": "7.66s"}
# inference-docs.cerebras.ai/support/rate-limits (the curl --verbose example)
CEREBRAS = {"x-ratelimit-limit-requests-day": "1000000000", "x-ratelimit-limit-tokens-minute": "1000000000",
            "x-ratelimit-remaining-requests-day": "999997455", "x-ratelimit-remaining-tokens-minute": "999998298",
            "x-ratelimit-reset-requests-day": "33011.382867097855",
            "x-ratelimit-reset-tokens-minute": "11.382867097854614"}


def test_groq_headroom_counts_requests_of_the_day() -> None:
    reading = read(GROQ, "groq", NOW_S)
    assert (reading.remaining_requests, reading.limit_requests, reading.wait_s) == (14370, 14400, None)


def test_groq_spent_tokens_wait_for_the_minute_spent_requests_for_the_day() -> None:
    tokens_out = read({**GROQ, "x-ratelimit-remaining-tokens": "0"}, "groq", NOW_S)
    assert tokens_out.wait_s == pytest.approx(7.66) and not tokens_out.daily
    requests_out = read({**GROQ, "x-ratelimit-remaining-requests": "0"}, "groq", NOW_S)
    assert requests_out.wait_s == pytest.approx(179.56) and requests_out.daily


def test_cerebras_day_and_minute_headers_in_seconds() -> None:
    reading = read(CEREBRAS, "cerebras", NOW_S)
    assert reading.remaining_requests == 999997455 and reading.wait_s is None
    tokens_out = read({**CEREBRAS, "x-ratelimit-remaining-tokens-minute": "0"}, "cerebras", NOW_S)
    assert tokens_out.wait_s == pytest.approx(11.3829, abs=1e-3) and not tokens_out.daily
    day_out = read({**CEREBRAS, "x-ratelimit-remaining-requests-day": "0",
                    "x-ratelimit-remaining-tokens-minute": "0"}, "cerebras", NOW_S)
    assert day_out.wait_s == pytest.approx(33011.38, abs=0.01) and day_out.daily  # the longer one wins


def test_openrouter_reset_is_epoch_milliseconds() -> None:
    reset_ms = int((NOW_S + 3600) * 1000)
    reading = read({"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset_ms)},
                   "openrouter", NOW_S)
    assert reading.limit_requests == 50 and reading.remaining_requests == 0
    assert reading.wait_s == pytest.approx(3600) and reading.daily
    fine = read({"X-RateLimit-Limit": "20", "X-RateLimit-Remaining": "19", "X-RateLimit-Reset": str(reset_ms)},
                "openrouter", NOW_S)
    assert fine.wait_s is None and fine.remaining_requests == 19


def test_none_dialect_and_missing_headers_read_nothing() -> None:
    assert read(GROQ, "none").empty
    assert read({}, "openai").empty
    assert read({"content-type": "text/event-stream"}, "cerebras").empty


@pytest.mark.parametrize(("value", "seconds"), [
    ("7.66s", 7.66), ("2m59.56s", 179.56), ("1h2m", 3720.0), ("250ms", 0.25), ("12", 12.0),
    ("33011.382867097855", 33011.382867097855), ("soon", None), ("", None),
])
def test_parse_reset(value: str, seconds: float | None) -> None:
    parsed = parse_reset_s(value, NOW_S)
    assert parsed == (pytest.approx(seconds) if seconds is not None else None)


def test_parse_reset_epochs() -> None:
    assert parse_reset_s(str(int((NOW_S + 90) * 1000)), NOW_S) == pytest.approx(90)
    assert parse_reset_s(str(int(NOW_S + 90)), NOW_S) == pytest.approx(90)


def test_daily_boundaries() -> None:
    # 2026-12-06 17:30 UTC is 09:30 in Los Angeles (PST, UTC-8).
    now = 1_796_578_200.0
    assert seconds_until_daily_reset("utc_midnight", now) == pytest.approx(6.5 * 3600)
    assert seconds_until_daily_reset("pacific_midnight", now) == pytest.approx(14.5 * 3600)
    assert 0 < seconds_until_daily_reset("utc_midnight", time.time()) <= 86400
